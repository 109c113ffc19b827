"""Stages 3-8 of I2X as small pure functions over tensors: the numbers :func:`i2x.analyze`
computes on a run, usable on their own.

1. :func:`prototype_intensity`  ``P[t, i, k]``: mean raw saliency over the positions of prototype k
2. :func:`changes`              ``dP^t = P^{t+1} - P^t``, ``dY^t = Yhat^{t+1} - Yhat^t``
3. :func:`ridge_beta` / :func:`ridge_sequence`  ``beta^t = (pi^T pi + lam I)^-1 pi^T C``
4. :func:`find_groups`          per class, HDBSCAN over the confidence-change trajectories
5. :func:`presence`             share of samples in which a prototype occurs at all
6. :func:`shared_and_specialised`  per class: prototypes the whole class uses vs its variants
7. :func:`separation_timeline`  per class pair: when it stopped being confused and which prototypes did it
8. :func:`prototype_scores` / :func:`flag_uncertain`  prototypes the model stays unsure about;
   :func:`pair_decisive`  one-sided prototypes (shortcut candidates)

``docs/analysis.md`` gives every formula and default. Everything here is re-exported by
:mod:`i2x.analysis`, which runs these on a run folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from i2x import ops
from i2x._internal.checks import (
    check_fraction,
    check_int,
    check_positive_number,
    describe,
)

__all__ = [
    "prototype_intensity",
    "changes",
    "standardize_columns",
    "ridge_beta",
    "ridge_sequence",
    "group_min_cluster_size",
    "cluster_trajectories",
    "find_groups",
    "presence",
    "class_presence",
    "assignment_counts",
    "pair_presence",
    "uses_hdbscan",
    "shared_and_specialised",
    "confusion_matrices",
    "pair_error",
    "separation_index",
    "separating_prototypes",
    "separation_timeline",
    "most_confused_pairs",
    "sign_changes",
    "score_sign_changes",
    "score_cancellation",
    "register_uncertainty_score",
    "uncertainty_scores",
    "resolve_uncertainty_score",
    "prototype_scores",
    "flag_uncertain",
    "pair_uncertainty",
    "score_decisive",
    "pair_decisive",
    "ZERO_VARIANCE_RTOL",
    "score_swing",
]

# A column counts as constant when its standard deviation is below this fraction of its largest
# |value|: centring a constant column in float64 leaves rounding residue of ~1e-16 relative, which
# must not be blown up to unit variance; float32 inputs cannot vary by less than ~6e-8 relative.
ZERO_VARIANCE_RTOL = 1e-10

# HDBSCAN never forms clusters smaller than this, whatever the class size.
_MIN_CLUSTER_FLOOR = 5


# ----------------------------------------------------------------------------------------------
# Argument checks (messages name the argument, what was expected and what came)


def _tensor(x, name: str, dim: int | None = None, *, floating: bool | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {describe(x)}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got {describe(x)}")
    if floating is True and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {describe(x)}")
    if floating is False and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor, got {describe(x)}")
    return x


def _finite(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf of {x.numel()}")
    return x


def _labels(labels, name: str = "labels", n: int | None = None, num_classes: int | None = None) -> torch.Tensor:
    labels = _tensor(labels, name, 1, floating=False)
    if n is not None and labels.numel() != n:
        raise ValueError(f"{name}: expected {n} labels (one per probe sample), got {labels.numel()}")
    if num_classes is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name}: expected values in [0, {num_classes - 1}], got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.long()


def _mask(mask, n: int, name: str = "sample_mask") -> torch.Tensor:
    mask = _tensor(mask, name, 1)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor, got {describe(mask)}")
    if mask.numel() != n:
        raise ValueError(f"{name}: expected {n} entries (one per sample), got {mask.numel()}")
    return mask


# ----------------------------------------------------------------------------------------------
# 1-2. Intensity and changes


def prototype_intensity(
    saliency: torch.Tensor, assignment: torch.Tensor, num_prototypes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Saliency-weighted prototype pooling at every checkpoint.

    Args:
        saliency: ``[T, N, h, w]`` raw GradCAM grids (floating point, finite).
        assignment: ``[N, h, w]`` integer prototype index of each position, in ``[0, K)``; fixed
            across checkpoints.
        num_prototypes: K.

    Returns:
        ``(P [T, N, K] float32, counts [N, K] int64)``: ``P[t, i, k]`` is the mean saliency over the
        positions of sample i assigned to prototype k (0 where the prototype is absent) and
        ``counts[i, k]`` the number of those positions (0 flags absence).
    """
    saliency = _finite(_tensor(saliency, "saliency", 4, floating=True), "saliency")
    assignment = _tensor(assignment, "assignment", 3, floating=False)
    k = check_int(num_prototypes, "num_prototypes", 1)
    if tuple(assignment.shape) != tuple(saliency.shape[1:]):
        raise ValueError(
            f"assignment: expected shape [N, h, w] = {list(saliency.shape[1:])} (saliency's [T, N, h, w] "
            f"without T), got {list(assignment.shape)}"
        )
    if saliency.shape[0] < 1:
        raise ValueError(f"saliency: expected at least one checkpoint (T >= 1), got {describe(saliency)}")
    if assignment.numel() and (int(assignment.min()) < 0 or int(assignment.max()) >= k):
        raise ValueError(
            f"assignment: expected prototype indices in [0, {k - 1}] for num_prototypes={k}, "
            f"got range [{int(assignment.min())}, {int(assignment.max())}]"
        )
    a = assignment.to(device=saliency.device, dtype=torch.int64).contiguous()
    sal = saliency.to(torch.float32)
    pooled = [ops.prototype_pool(sal[t].contiguous(), a, k) for t in range(sal.shape[0])]
    # Positions never move between checkpoints, so the counts of the first checkpoint are all counts.
    return torch.stack([p[0] for p in pooled]), pooled[0][1]


def changes(intensity: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Changes between consecutive checkpoints, in float64.

    Args:
        intensity: ``P [T, N, K]``.
        probs: ``Yhat [T, N, M]`` softmax outputs.

    Returns:
        ``(dP [T-1, N, K], dY [T-1, N, M])`` with ``dP[t] = P[t+1] - P[t]`` (same for dY).
    """
    intensity = _finite(_tensor(intensity, "intensity", 3, floating=True), "intensity")
    probs = _finite(_tensor(probs, "probs", 3, floating=True), "probs")
    if intensity.shape[:2] != probs.shape[:2]:
        raise ValueError(
            f"intensity [T, N, K] and probs [T, N, M] must agree in T and N, got {list(intensity.shape)} "
            f"and {list(probs.shape)}"
        )
    if intensity.shape[0] < 2:
        raise ValueError(f"intensity: expected at least 2 checkpoints (T >= 2), got T = {intensity.shape[0]}")
    p, y = intensity.double(), probs.double()
    return p[1:] - p[:-1], y[1:] - y[:-1]


# ----------------------------------------------------------------------------------------------
# 3. Ridge regression: prototype changes -> confidence changes


def standardize_columns(x: torch.Tensor) -> torch.Tensor:
    """Standardise every column of ``x [..., n, K]`` over its n rows, in float64.

    ``(x - mean) / std`` with the population std (ddof 0, as sklearn's StandardScaler). A column
    whose std is at most ``ZERO_VARIANCE_RTOL`` x its largest |value| (constant, e.g. a prototype
    absent from every sample) becomes all zeros; no NaN is ever produced.
    """
    x = _tensor(x, "x", floating=True)
    if x.dim() < 2:
        raise ValueError(f"x: expected a [..., n, K] tensor (at least 2-D), got {describe(x)}")
    x = x.double()
    if x.shape[-2] == 0:
        return x.clone()
    centred = x - x.mean(dim=-2, keepdim=True)
    std = centred.square().mean(dim=-2, keepdim=True).sqrt()
    constant = std <= ZERO_VARIANCE_RTOL * x.abs().amax(dim=-2, keepdim=True)
    return torch.where(constant, torch.zeros_like(centred), centred / torch.where(constant, torch.ones_like(std), std))


def ridge_beta(pi: torch.Tensor, C: torch.Tensor, lam: float, *, standardize: bool = True) -> torch.Tensor:
    """Ridge coefficients ``beta = (pi^T pi + lam I)^-1 pi^T C`` in float64 (no intercept).

    Args:
        pi: ``[..., n, K]`` regressors: the rows of dP (standardised per column here when
            ``standardize``; pass ``standardize=False`` for an already prepared design matrix).
        C: ``[..., n, M]`` targets: the rows of dY.
        lam: the ridge penalty, > 0 (it keeps the system solvable when a column is all zeros).

    Returns:
        ``[..., K, M]`` float64, solved by Cholesky (no explicit inverse). Leading dims batch.
    """
    pi = _tensor(pi, "pi", floating=True)
    C = _tensor(C, "C", floating=True)
    lam = check_positive_number(lam, "lam")
    if pi.dim() < 2 or C.dim() != pi.dim() or pi.shape[:-1] != C.shape[:-1]:
        raise ValueError(
            f"pi [..., n, K] and C [..., n, M] must share their leading dims and n, got {list(pi.shape)} and "
            f"{list(C.shape)}"
        )
    _finite(pi, "pi")
    _finite(C, "C")
    x = standardize_columns(pi) if standardize else pi.double()
    y = C.double()
    k = x.shape[-1]
    xt = x.transpose(-1, -2)
    gram = xt @ x + lam * torch.eye(k, dtype=torch.float64, device=x.device)
    chol, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        raise ValueError(
            f"ridge_beta: pi^T pi + lam I is not positive definite (lam={lam}); the inputs are too large "
            "for float64 or lam is too small"
        )
    return torch.cholesky_solve(xt @ y, chol)


def ridge_sequence(
    dP: torch.Tensor, dY: torch.Tensor, lam: float, sample_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One ridge regression per step: ``beta^t`` from the rows ``dP[t, i]``, ``dY[t, i]``.

    Args:
        dP: ``[T-1, N, K]`` prototype intensity changes (standardised per step and column over the
            selected samples).
        dY: ``[T-1, N, M]`` confidence changes.
        lam: ridge penalty, > 0.
        sample_mask: optional ``[N]`` bool: the samples this regression uses (a class, a group).

    Returns:
        ``[T-1, K, M]`` float64.
    """
    dP = _tensor(dP, "dP", 3, floating=True)
    dY = _tensor(dY, "dY", 3, floating=True)
    if dP.shape[:2] != dY.shape[:2]:
        raise ValueError(
            f"dP [T-1, N, K] and dY [T-1, N, M] must agree in T-1 and N, got {list(dP.shape)} and {list(dY.shape)}"
        )
    if sample_mask is not None:
        mask = _mask(sample_mask, dP.shape[1]).to(dP.device)
        dP, dY = dP[:, mask], dY[:, mask]
    return ridge_beta(dP, dY, lam)


# ----------------------------------------------------------------------------------------------
# 4. Groups: HDBSCAN over confidence-change trajectories, per class


def group_min_cluster_size(class_size: int, group_min_fraction: float) -> int:
    """HDBSCAN's ``min_cluster_size`` for a class of ``class_size`` samples:
    ``max(5, round(group_min_fraction * class_size))`` (Python's round, half to even)."""
    class_size = check_int(class_size, "class_size", 0)
    fraction = check_fraction(group_min_fraction, "group_min_fraction")
    return max(_MIN_CLUSTER_FLOOR, round(fraction * class_size))


def uses_hdbscan(class_size: int, dims: int, min_cluster_size: int) -> bool:
    """Whether a class is clustered at all: HDBSCAN needs room for two clusters and at least one
    trajectory dimension (else the whole class is one group)."""
    return dims >= 1 and class_size >= 2 * min_cluster_size


def cluster_trajectories(trajectories: torch.Tensor, min_cluster_size: int) -> torch.Tensor:
    """``sklearn.cluster.HDBSCAN(min_cluster_size)`` labels of ``trajectories [n, D]`` -> ``[n]`` int64
    (cluster ids from 0, -1 for noise). Every other HDBSCAN parameter stays at sklearn's default."""
    from sklearn.cluster import HDBSCAN  # heavy import, only needed here

    trajectories = _finite(_tensor(trajectories, "trajectories", 2, floating=True), "trajectories")
    mcs = check_int(min_cluster_size, "min_cluster_size", 2)
    if trajectories.shape[0] < 1:
        return torch.zeros(0, dtype=torch.int64)
    labels = HDBSCAN(min_cluster_size=mcs, copy=True).fit_predict(trajectories.detach().double().cpu().numpy())
    return torch.as_tensor(labels, dtype=torch.int64)


def find_groups(
    dY: torch.Tensor, labels: torch.Tensor, num_classes: int, group_min_fraction: float = 0.05
) -> torch.Tensor:
    """Per-class groups (the class's variants) from the true-class confidence-change trajectories.

    Sample i's trajectory is ``dY[:, i, y_i]`` (T-1 dims). Within each class c of n_c samples,
    HDBSCAN with ``min_cluster_size = group_min_cluster_size(n_c, group_min_fraction)`` clusters the
    trajectories; its noise (-1) is a group of its own. A class with ``n_c < 2 * min_cluster_size``
    (or trajectories of 0 dims) is one group, 0.

    Args:
        dY: ``[T-1, N, M]`` confidence changes.
        labels: ``[N]`` int class of each sample.

    Returns:
        ``groups [N]`` int64: the group id within the sample's class (-1 = HDBSCAN noise).
    """
    dY = _finite(_tensor(dY, "dY", 3, floating=True), "dY")
    m = check_int(num_classes, "num_classes", 1)
    if dY.shape[2] != m:
        raise ValueError(f"dY: expected [T-1, N, {m}] for num_classes={m}, got {list(dY.shape)}")
    labels = _labels(labels, "labels", dY.shape[1], m).to(dY.device)
    check_fraction(group_min_fraction, "group_min_fraction")
    own = dY.gather(2, labels.view(1, -1, 1).expand(dY.shape[0], -1, 1)).squeeze(2)  # [T-1, N]
    groups = torch.zeros(dY.shape[1], dtype=torch.int64)
    for c in range(m):
        members = (labels == c).nonzero().flatten().cpu()
        mcs = group_min_cluster_size(members.numel(), group_min_fraction)
        if uses_hdbscan(members.numel(), dY.shape[0], mcs):
            groups[members] = cluster_trajectories(own[:, members.to(dY.device)].T, mcs)
    return groups


# ----------------------------------------------------------------------------------------------
# 5-6. Presence; shared and specialised prototypes


def presence(counts: torch.Tensor, sample_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Share of the (masked) samples in which each prototype occurs at all: ``[K]`` float64.

    ``counts [N, K]`` are the position counts of :func:`prototype_intensity`; no samples -> zeros.
    """
    counts = _tensor(counts, "counts", 2, floating=False)
    present = counts > 0
    if sample_mask is not None:
        present = present[_mask(sample_mask, counts.shape[0]).to(counts.device)]
    if present.shape[0] == 0:
        return torch.zeros(counts.shape[1], dtype=torch.float64, device=counts.device)
    return present.double().mean(dim=0)


def class_presence(counts: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[M, K]`` float64: presence of each prototype within each class (0 for an empty class)."""
    counts = _tensor(counts, "counts", 2, floating=False)
    m = check_int(num_classes, "num_classes", 1)
    labels = _labels(labels, "labels", counts.shape[0], m).to(counts.device)
    return torch.stack([presence(counts, labels == c) for c in range(m)])


def assignment_counts(assignment: torch.Tensor, num_prototypes: int) -> torch.Tensor:
    """``[N, K]`` int64: how many grid positions of each sample ``assignment [N, h, w]`` gives to
    each prototype (the ``counts`` of :func:`prototype_intensity`, without the saliency)."""
    assignment = _tensor(assignment, "assignment", 3, floating=False).long()
    k = check_int(num_prototypes, "num_prototypes", 1)
    n = assignment.shape[0]
    flat = assignment.reshape(n, -1)
    return torch.zeros(n, k, dtype=torch.int64, device=assignment.device).scatter_add_(1, flat, torch.ones_like(flat))


def _group_stat(group: int, presence_g: float | torch.Tensor, mean_beta_g: float | torch.Tensor | None) -> dict:
    return {"group": int(group), "presence": float(presence_g),
            "mean_beta": None if mean_beta_g is None else float(mean_beta_g)}


def shared_and_specialised(
    class_presence_c: torch.Tensor,
    class_mean_beta: torch.Tensor,
    group_presence: Mapping[int, torch.Tensor],
    group_mean_beta: Mapping[int, torch.Tensor | None],
    shared_presence: float = 0.5,
) -> tuple[list[dict], list[dict]]:
    """Shared and specialised prototypes of one class c.

    Args:
        class_presence_c: ``[K]`` presence of each prototype in class c.
        class_mean_beta: ``[K]`` mean over t of the class regression's ``beta^t[k, c]``.
        group_presence: group id -> ``[K]`` presence within that group (-1 = noise).
        group_mean_beta: group id -> ``[K]`` mean over t of the group regression's ``beta^t[k, c]``,
            or None for a group too small to regress.
        shared_presence: the presence threshold.

    Returns:
        ``(shared, specialised)``, lists of dicts. Shared: presence >= threshold and mean beta > 0.
        Specialised: not shared, present in >= threshold of a non-noise group whose mean beta is
        > 0 (its ``variant_groups``) while present in < threshold of another non-noise group
        (``absent_in``). Each entry: prototype, presence, mean_beta, groups (every group where it is
        present in >= threshold, with that group's presence and mean beta), absent_in, and for
        specialised ones variant_groups. Shared sorted by mean beta, specialised by their best
        variant group's mean beta, both descending.
    """
    thr = check_fraction(shared_presence, "shared_presence")
    p = _tensor(class_presence_c, "class_presence_c", 1, floating=True).double().cpu()
    b = _finite(_tensor(class_mean_beta, "class_mean_beta", 1, floating=True), "class_mean_beta").double().cpu()
    if p.shape != b.shape:
        raise ValueError(f"class_presence_c and class_mean_beta must both be [K], got {list(p.shape)} "
                         f"and {list(b.shape)}")
    k = p.numel()
    gp: dict[int, torch.Tensor] = {}
    for g, t in group_presence.items():
        t = _tensor(t, f"group_presence[{g}]", 1, floating=True).double().cpu()
        if t.numel() != k:
            raise ValueError(f"group_presence[{g}]: expected [{k}], got {list(t.shape)}")
        gp[int(g)] = t
    gb: dict[int, torch.Tensor] = {}  # the groups with a mean beta (not too small to regress)
    for g in gp:
        beta = group_mean_beta.get(g)
        if beta is not None:
            beta = _tensor(beta, f"group_mean_beta[{g}]", 1, floating=True).double().cpu()
            if beta.numel() != k:
                raise ValueError(f"group_mean_beta[{g}]: expected [{k}], got {list(beta.shape)}")
            gb[g] = beta
    order = sorted(gp)
    shared: list[dict] = []
    specialised: list[dict] = []
    for proto in range(k):
        present_in = [g for g in order if gp[g][proto] >= thr]
        absent_in = [g for g in order if g != -1 and gp[g][proto] < thr]
        groups = [_group_stat(g, gp[g][proto], gb[g][proto] if g in gb else None) for g in present_in]
        entry = {"prototype": proto, "presence": float(p[proto]), "mean_beta": float(b[proto]), "groups": groups,
                 "absent_in": absent_in}
        if p[proto] >= thr and b[proto] > 0:
            shared.append(entry)
            continue
        variants = [g for g in present_in if g != -1 and g in gb and gb[g][proto] > 0]
        # A variant needs a counterpart: another non-noise group of the class lacking the prototype
        # (absent_in and variants never overlap: one is below the threshold, the other at or above).
        if variants and absent_in:
            entry["variant_groups"] = variants
            specialised.append(entry)
    shared.sort(key=lambda e: (-e["mean_beta"], e["prototype"]))
    best = {e["prototype"]: max(float(gb[g][e["prototype"]]) for g in e["variant_groups"]) for e in specialised}
    specialised.sort(key=lambda e: (-best[e["prototype"]], e["prototype"]))
    return shared, specialised


# ----------------------------------------------------------------------------------------------
# 7. Confusions and the separation timeline


def confusion_matrices(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard and soft confusion at every checkpoint.

    Args:
        probs: ``[T, N, M]`` softmax outputs.
        labels: ``[N]`` true classes.

    Returns:
        ``(hard [T, M, M] int64, soft [T, M, M] float64)``: ``hard[t, a, b]`` counts the samples of
        class a predicted b (argmax, ties to the lower class), ``soft[t, a, b]`` sums their
        probability of b.
    """
    probs = _finite(_tensor(probs, "probs", 3, floating=True), "probs")
    t, n, m = probs.shape
    labels = _labels(labels, "labels", n, m).to(probs.device)
    pred = probs.argmax(dim=2)  # [T, N]
    flat = (labels.view(1, -1) * m + pred + torch.arange(t, device=probs.device).view(-1, 1) * m * m).flatten()
    hard = torch.bincount(flat, minlength=t * m * m).view(t, m, m)
    soft = torch.zeros(t, m, m, dtype=torch.float64, device=probs.device).index_add_(1, labels, probs.double())
    return hard, soft


def pair_error(confusion: torch.Tensor, class_sizes: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """``e^t = (C[t, a, b] + C[t, b, a]) / (n_a + n_b)`` -> ``[T]`` float64 (hard or soft C)."""
    confusion = _tensor(confusion, "confusion", 3)
    m = confusion.shape[1]
    a, b = check_int(a, "a", 0), check_int(b, "b", 0)
    if a >= m or b >= m or a == b:
        raise ValueError(f"(a, b): expected two different classes in [0, {m - 1}], got ({a}, {b})")
    sizes = _tensor(class_sizes, "class_sizes", 1)
    total = int(sizes[a]) + int(sizes[b])
    if total == 0:
        raise ValueError(f"pair ({a}, {b}): neither class has probe samples, its error rate is undefined")
    return (confusion[:, a, b].double() + confusion[:, b, a].double()) / total


def separation_index(errors: torch.Tensor, threshold: float = 0.05) -> int | None:
    """The first checkpoint index from which ``errors [T]`` stays <= threshold to the end; None when
    the final error exceeds it (the pair is still confused)."""
    errors = _finite(_tensor(errors, "errors", 1, floating=True), "errors")
    thr = check_fraction(threshold, "threshold")
    if errors.numel() == 0:
        raise ValueError("errors: expected at least one checkpoint, got an empty tensor")
    above = (errors > thr).nonzero().flatten()
    if above.numel() == 0:
        return 0
    last = int(above[-1])
    return None if last == errors.numel() - 1 else last + 1


def separating_prototypes(
    beta_t: torch.Tensor, a: int, b: int, pair_presence: torch.Tensor, n_top: int = 3, min_presence: float = 0.1
) -> list[dict]:
    """The prototypes that pushed class a and class b apart at one step.

    ``d_k = beta_t[k, a] - beta_t[k, b]`` over prototypes present in >= min_presence of the pair's
    samples and with d_k != 0; the top ``n_top`` by |d_k| (ties to the lower id), each as
    ``{prototype, d, beta_a, beta_b, presence}`` with the signed d.
    """
    beta_t = _finite(_tensor(beta_t, "beta_t", 2, floating=True), "beta_t").double().cpu()
    pres = _tensor(pair_presence, "pair_presence", 1, floating=True).double().cpu()
    if pres.numel() != beta_t.shape[0]:
        raise ValueError(f"pair_presence: expected [{beta_t.shape[0]}] (K), got {list(pres.shape)}")
    n_top = check_int(n_top, "n_top", 0)
    thr = check_fraction(min_presence, "min_presence")
    d = beta_t[:, a] - beta_t[:, b]
    eligible = [k for k in range(d.numel()) if pres[k] >= thr and d[k] != 0]
    eligible.sort(key=lambda k: (-abs(float(d[k])), k))
    return [
        {"prototype": k, "d": float(d[k]), "beta_a": float(beta_t[k, a]), "beta_b": float(beta_t[k, b]),
         "presence": float(pres[k])}
        for k in eligible[:n_top]
    ]


def pair_presence(cls_presence: torch.Tensor, class_sizes: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """``[K]`` share of the pair (a, b)'s samples in which each prototype occurs: the size-weighted
    mean of the two classes' rows of ``cls_presence`` (:func:`class_presence`)."""
    na, nb = float(class_sizes[a]), float(class_sizes[b])
    return (na * cls_presence[a].double() + nb * cls_presence[b].double()) / max(na + nb, 1.0)


def separation_timeline(
    hard: torch.Tensor,
    soft: torch.Tensor,
    class_sizes: torch.Tensor,
    beta_pooled: torch.Tensor,
    cls_presence: torch.Tensor,
    steps: Sequence[int],
    threshold: float = 0.05,
    n_top: int = 3,
    min_presence: float = 0.1,
    class_names: Sequence[str] | None = None,
) -> tuple[list[dict], list[list[int]]]:
    """When every class pair a < b stopped being confused, and which prototypes did it.

    Args:
        hard, soft: ``[T, M, M]`` confusions (:func:`confusion_matrices`).
        class_sizes: ``[M]`` probe samples per class.
        beta_pooled: ``[T-1, K, M]`` pooled regression.
        cls_presence: ``[M, K]`` (:func:`class_presence`).
        steps: the T checkpoint steps.

    Returns:
        ``(entries, skipped)``. One entry per pair with samples: pair, names, status ("separated",
        "separated from the start" or "still confused"), separated_at (step) and
        separated_at_index (or None), error and soft_error ``[T]``, final_error and prototypes: at
        the transition into separated_at (beta index t-1) :func:`separating_prototypes`; empty when
        separated from the start or still confused. Sorted by separation (still confused last),
        then by pair. ``skipped``: pairs with no probe samples.
    """
    hard = _tensor(hard, "hard", 3)
    soft = _tensor(soft, "soft", 3)
    t, m, _ = hard.shape
    if tuple(soft.shape) != (t, m, m) or hard.shape[2] != m:
        raise ValueError(f"hard and soft: expected two [T, M, M] tensors, got {list(hard.shape)} "
                         f"and {list(soft.shape)}")
    beta_pooled = _tensor(beta_pooled, "beta_pooled", 3, floating=True)
    if beta_pooled.shape[0] != t - 1 or beta_pooled.shape[2] != m:
        raise ValueError(f"beta_pooled: expected [{t - 1}, K, {m}], got {list(beta_pooled.shape)}")
    cls_presence = _tensor(cls_presence, "cls_presence", 2, floating=True)
    if tuple(cls_presence.shape) != (m, beta_pooled.shape[1]):
        raise ValueError(f"cls_presence: expected [{m}, {beta_pooled.shape[1]}], got {list(cls_presence.shape)}")
    steps = [int(s) for s in steps]
    if len(steps) != t:
        raise ValueError(f"steps: expected {t} checkpoint steps, got {len(steps)}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(m)]
    entries, skipped = [], []
    for a in range(m):
        for b in range(a + 1, m):
            if int(class_sizes[a]) + int(class_sizes[b]) == 0:
                skipped.append([a, b])
                continue
            err = pair_error(hard, class_sizes, a, b)
            idx = separation_index(err, threshold)
            protos = []
            if idx is None:
                status = "still confused"
            elif idx == 0:
                status = "separated from the start"
            else:
                status = "separated"
                pres = pair_presence(cls_presence, class_sizes, a, b)
                protos = separating_prototypes(beta_pooled[idx - 1], a, b, pres, n_top, min_presence)
            entries.append({
                "pair": [a, b],
                "names": [names[a], names[b]],
                "status": status,
                "separated_at": None if idx is None else steps[idx],
                "separated_at_index": idx,
                "error": [float(v) for v in err],
                "soft_error": [float(v) for v in pair_error(soft, class_sizes, a, b)],
                "final_error": float(err[-1]),
                "prototypes": protos,
            })
    entries.sort(key=lambda e: (t if e["separated_at_index"] is None else e["separated_at_index"], e["pair"]))
    return entries, skipped


def most_confused_pairs(
    hard_final: torch.Tensor, soft_final: torch.Tensor, class_sizes: torch.Tensor, n: int
) -> list[tuple[int, int]]:
    """The ``n`` pairs a < b with the most final hard confusions ``C[a, b] + C[b, a]``; ties broken by
    the soft confusions, then by the pair. Pairs without probe samples are left out."""
    hard_final = _tensor(hard_final, "hard_final", 2)
    soft_final = _tensor(soft_final, "soft_final", 2)
    n = check_int(n, "n", 0)
    m = hard_final.shape[0]
    ranked = []
    for a in range(m):
        for b in range(a + 1, m):
            if int(class_sizes[a]) + int(class_sizes[b]) == 0:
                continue
            h = int(hard_final[a, b]) + int(hard_final[b, a])
            s = float(soft_final[a, b]) + float(soft_final[b, a])
            ranked.append((-h, -s, a, b))
    ranked.sort()
    return [(a, b) for _, _, a, b in ranked[:n]]


# ----------------------------------------------------------------------------------------------
# 8. Uncertainty scores (a registry: swap by name, or pass any callable d [T-1] -> float)


def _sequence(d) -> torch.Tensor:
    d = torch.as_tensor(d, dtype=torch.float64)
    if d.dim() != 1:
        raise ValueError(f"d: expected a 1-D [T-1] sequence, got shape {list(d.shape)}")
    return _finite(d, "d")


def sign_changes(d) -> int:
    """How often ``d [T-1]`` changes sign, counted over its nonzero entries (zeros are skipped)."""
    nz = _sequence(d)
    nz = nz[nz != 0]
    return int((torch.sign(nz[1:]) != torch.sign(nz[:-1])).sum()) if nz.numel() > 1 else 0


def score_sign_changes(d) -> float:
    """``U = sign_changes(d) * mean_t |d_t|``: swings in sign, weighted by their size."""
    d = _sequence(d)
    return float(sign_changes(d) * d.abs().mean()) if d.numel() else 0.0


def score_cancellation(d) -> float:
    """``U = (1 - |sum_t d_t| / sum_t |d_t|) * mean_t |d_t|``: how much of the movement cancels out."""
    d = _sequence(d)
    total = float(d.abs().sum())
    if total == 0.0:
        return 0.0
    return (1.0 - abs(float(d.sum())) / total) * float(d.abs().mean())


def score_swing(d) -> float:
    """``U = min(sum_t max(d_t, 0), sum_t max(-d_t, 0))``: the smaller of the prototype's total
    push towards a and its total push towards b. Large only when it pushed hard both ways; a sign
    flip among negligible values (the first checkpoints, where the model has barely moved) adds
    next to nothing, unlike a count of sign changes."""
    d = _sequence(d)
    return float(min(d.clamp(min=0).sum(), (-d).clamp(min=0).sum())) if d.numel() else 0.0


_SCORES: dict[str, tuple[Callable, str]] = {
    "swing": (score_swing, "U_k = min(sum_t max(d_k^t, 0), sum_t max(-d_k^t, 0))  (the smaller of the total pushes "
                           "towards a and towards b)"),
    "sign_changes": (score_sign_changes, "U_k = sign_changes(d_k) * mean_t |d_k^t|  (sign changes over the "
                                         "nonzero d_k^t)"),
    "cancellation": (score_cancellation, "U_k = (1 - |sum_t d_k^t| / sum_t |d_k^t|) * mean_t |d_k^t|  "
                                         "(0 when d_k = 0)"),
}


def register_uncertainty_score(name: str, fn: Callable, formula: str, *, replace: bool = False) -> None:
    """Make ``fn(d [T-1] float64 tensor) -> float`` available to :func:`analyze` as ``name``;
    ``formula`` is the text recorded with the results."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {describe(name)}")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable d -> float, got {describe(fn)}")
    if not isinstance(formula, str) or not formula.strip():
        raise TypeError(f"formula: expected a non-empty str describing the score, got {describe(formula)}")
    if name in _SCORES and not replace:
        raise ValueError(f"uncertainty score {name!r} is already registered; pass replace=True to replace it")
    _SCORES[name] = (fn, formula)


def uncertainty_scores() -> dict[str, str]:
    """The registered scores: name -> formula."""
    return {name: formula for name, (_, formula) in _SCORES.items()}


def resolve_uncertainty_score(score) -> tuple[str, Callable, str]:
    """``(name, fn, formula)`` of a registered name or of a callable (its name is
    ``callable:<module>.<qualname>``, its formula its ``formula`` attribute or its docstring's first line)."""
    if isinstance(score, str):
        if score not in _SCORES:
            raise ValueError(f"uncertainty_score: expected one of {sorted(_SCORES)} or a callable, got {score!r}")
        fn, formula = _SCORES[score]
        return score, fn, formula
    if callable(score):
        qual = getattr(score, "__qualname__", type(score).__qualname__)
        name = f"callable:{getattr(score, '__module__', '?')}.{qual}"
        doc = (getattr(score, "__doc__", None) or "").strip()
        formula = getattr(score, "formula", None) or (doc.splitlines()[0] if doc else f"custom score {qual}")
        return name, score, str(formula)
    raise TypeError(f"uncertainty_score: expected a registered name {sorted(_SCORES)} or a callable, "
                    f"got {describe(score)}")


def prototype_scores(d: torch.Tensor, score="sign_changes") -> torch.Tensor:
    """Apply an uncertainty score to every prototype's sequence: ``d [T-1, K]`` -> ``U [K]`` float64."""
    d = _finite(_tensor(d, "d", 2, floating=True), "d").double().cpu()
    name, fn, _ = resolve_uncertainty_score(score)
    out = torch.empty(d.shape[1], dtype=torch.float64)
    for k in range(d.shape[1]):
        value = fn(d[:, k].clone())
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"uncertainty score {name}: expected a float, got {describe(value)}") from None
        if not math.isfinite(value):
            raise ValueError(f"uncertainty score {name}: returned {value} for prototype {k}; expected a finite float")
        out[k] = value
    return out


def flag_uncertain(scores: torch.Tensor, eligible: torch.Tensor, flag_fraction: float = 0.5) -> torch.Tensor:
    """``[K]`` bool: eligible, ``U_k > 0`` and ``U_k >= flag_fraction * max_{eligible} U``."""
    scores = _finite(_tensor(scores, "scores", 1, floating=True), "scores")
    eligible = _mask(eligible, scores.numel(), "eligible").to(scores.device)
    frac = check_fraction(flag_fraction, "flag_fraction")
    if not bool(eligible.any()):
        return torch.zeros_like(eligible)
    top = scores[eligible].max()
    return eligible & (scores > 0) & (scores >= frac * top)


def pair_uncertainty(
    d: torch.Tensor, pair_presence: torch.Tensor, score="sign_changes", min_presence: float = 0.1,
    flag_fraction: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Score and flag the prototypes of one pair from ``d [T-1, K]`` and their presence ``[K]`` among
    the pair's samples -> ``{"score" [K] float64, "eligible" [K] bool, "flagged" [K] bool}``."""
    d = _tensor(d, "d", 2, floating=True)
    pres = _tensor(pair_presence, "pair_presence", 1, floating=True)
    if pres.numel() != d.shape[1]:
        raise ValueError(f"pair_presence: expected [{d.shape[1]}] (K of d [T-1, K]), got {list(pres.shape)}")
    thr = check_fraction(min_presence, "min_presence")
    scores = prototype_scores(d, score)
    eligible = pres.double().cpu() >= thr
    return {"score": scores, "eligible": eligible, "flagged": flag_uncertain(scores, eligible, flag_fraction)}


def score_decisive(d: torch.Tensor) -> torch.Tensor:
    """``D_k = |mean_t d_k^t|`` for ``d [T-1, K]`` -> ``[K]`` float64: how far a prototype pushed the
    pair one way on balance. A shortcut pushes one way all through training, so its swing is ~0
    while ``D_k`` is large; a prototype that swings both ways cancels out here."""
    d = _finite(_tensor(d, "d", 2, floating=True), "d").double().cpu()
    return d.mean(dim=0).abs() if d.shape[0] else torch.zeros(d.shape[1], dtype=torch.float64)


def pair_decisive(d: torch.Tensor, pair_presence: torch.Tensor, min_presence: float = 0.05,
                  flag_fraction: float = 0.5) -> dict[str, torch.Tensor]:
    """The second reading of a pair: decisive, one-sided prototypes (shortcut candidates).

    Eligible: present in >= ``min_presence`` of the pair's samples taken together (a cue drawn
    into one class only is class-skewed by design, so "present in each class" would exclude it).
    Flagged: eligible, ``D_k > 0`` and ``D_k >= flag_fraction * max_{eligible} D``. Returns
    ``{"score" [K] float64, "direction" [K] int64 (+1: towards a, -1: towards b), "eligible",
    "flagged"}``.
    """
    d = _tensor(d, "d", 2, floating=True)
    pres = _tensor(pair_presence, "pair_presence", 1, floating=True)
    if pres.numel() != d.shape[1]:
        raise ValueError(f"pair_presence: expected [{d.shape[1]}] (K of d [T-1, K]), got {list(pres.shape)}")
    scores = score_decisive(d)
    direction = torch.where(d.double().cpu().sum(dim=0) >= 0, 1, -1).long()
    eligible = pres.double().cpu() >= check_fraction(min_presence, "decisive_presence")
    return {"score": scores, "direction": direction, "eligible": eligible,
            "flagged": flag_uncertain(scores, eligible, flag_fraction)}
