"""The model-wide shortcut reading: decisive, one-sided prototypes of every class, found without
being told a pair or a class.

The pair reading (:func:`i2x.analysis.readings.pair_decisive`) looks only at the most confused
pairs, but a shortcut *lowers* the training errors it causes, so its class need not be among them.
Here every (prototype k, class c) gets four pieces of evidence, all from what :func:`i2x.analyze`
already computed (class presence, the pooled ``beta^t``, the final intensities and counts):

``skew``           presence of k in class c minus its presence in the other classes' samples
``effect``         ``mean_t beta^t[k, c]`` (pooled regression): how a rise of k moved confidence in c
``one_sided``      ``max(effect, 0) / sum_c' max(mean_t beta^t[k, c'], 0)``: the share of k's upward
                   push that goes to c (1: it raises c and no other class)
``concentration``  among class-c samples that show k, the mean of (share of the final saliency mass
                   on k's cells) / (share of the grid k holds): > 1 when the model looks at k more
                   than its area warrants, as it does at a small mark it decides on

``S[c, k] = max(skew, 0) * max(effect, 0) * one_sided * concentration`` ranks the candidates; a
candidate is flagged when its score clears the cut (Otsu's threshold over the candidates with
``S > 0``, or a given fraction of the top score). ``docs/analysis.md`` says why.
"""

from __future__ import annotations

import math

import torch

from i2x._internal.checks import check_number, describe
from i2x._internal.otsu import otsu_threshold, separability

__all__ = [
    "SHORTCUT_FORMULA",
    "class_skew",
    "saliency_concentration",
    "shortcut_scores",
    "flag_shortcuts",
    "model_shortcuts",
]

SHORTCUT_FORMULA = ("S[c, k] = max(skew, 0) * max(effect, 0) * one_sided * concentration; skew = presence in c - "
                    "presence in the other classes, effect = mean_t beta_pooled^t[k, c], one_sided = effect+ / "
                    "sum_c' effect+[c'], concentration = saliency-mass share / area share of k in class c")


def _matrix(x, name: str, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {describe(x)}")
    if x.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-d tensor, got shape {list(x.shape)}")
    return x.detach().double().cpu()


def class_skew(cls_presence: torch.Tensor, class_sizes: torch.Tensor) -> dict[str, torch.Tensor]:
    """``cls_presence [M, K]`` and ``class_sizes [M]`` -> ``{"inside", "outside", "skew"}`` ``[M, K]``:
    presence in class c, presence among the samples of every other class (size-weighted), and
    their difference."""
    p = _matrix(cls_presence, "cls_presence", 2)
    n = _matrix(class_sizes, "class_sizes", 1)
    if n.numel() != p.shape[0]:
        raise ValueError(f"class_sizes: expected [{p.shape[0]}] (M of cls_presence), got {list(n.shape)}")
    shown = p * n[:, None]                      # samples of class c showing k
    rest = (n.sum() - n).clamp(min=1)[:, None]  # samples of the other classes
    outside = (shown.sum(0, keepdim=True) - shown) / rest
    return {"inside": p, "outside": outside, "skew": p - outside}


def saliency_concentration(intensity: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor,
                           num_classes: int) -> torch.Tensor:
    """``[M, K]``: per class c and prototype k, over class-c samples where k is present, the mean of
    ``(P[i, k] counts[i, k] / sum_k' P[i, k'] counts[i, k']) / (counts[i, k] / sum_k' counts[i, k'])``
    (saliency-mass share over area share; 0 where k is absent from the class or the map is empty).
    ``intensity [N, K]`` is one checkpoint's (the final one)."""
    p = _matrix(intensity, "intensity", 2)
    cnt = _matrix(counts, "counts", 2)
    if p.shape != cnt.shape:
        raise ValueError(f"counts: expected the shape of intensity {list(p.shape)}, got {list(cnt.shape)}")
    y = torch.as_tensor(labels).long().cpu()
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels: expected [{p.shape[0]}], got {list(y.shape)}")
    mass = p.clamp(min=0) * cnt
    total = mass.sum(1, keepdim=True)
    area = cnt / cnt.sum(1, keepdim=True).clamp(min=1)
    ratio = torch.where((cnt > 0) & (total > 0), (mass / total.clamp(min=1e-300)) / area.clamp(min=1e-300),
                        torch.zeros_like(mass))
    out = torch.zeros(int(num_classes), p.shape[1], dtype=torch.float64)
    for c in range(int(num_classes)):
        rows = y == c
        shown = (cnt[rows] > 0).double().sum(0)
        out[c] = torch.where(shown > 0, ratio[rows].sum(0) / shown.clamp(min=1), torch.zeros_like(shown))
    return out


def shortcut_scores(skew: torch.Tensor, beta: torch.Tensor, concentration: torch.Tensor) -> dict[str, torch.Tensor]:
    """The evidence and the score, each ``[M, K]`` float64, from ``skew [M, K]``, the pooled
    ``beta [T-1, K, M]`` and ``concentration [M, K]``: ``effect`` (mean over steps),
    ``consistency`` (``sum_t max(beta, 0) / sum_t |beta|``: 1 when k pushed c up at every step),
    ``one_sided`` and ``score`` (module docstring)."""
    s = _matrix(skew, "skew", 2)
    b = _matrix(beta, "beta", 3)
    r = _matrix(concentration, "concentration", 2)
    m, k = s.shape
    if b.shape[1:] != (k, m):
        raise ValueError(f"beta: expected [T-1, {k}, {m}] (K, M of skew), got {list(b.shape)}")
    if r.shape != s.shape:
        raise ValueError(f"concentration: expected {list(s.shape)}, got {list(r.shape)}")
    if b.shape[0] == 0:
        zeros = torch.zeros(m, k, dtype=torch.float64)
        return {"effect": zeros, "consistency": zeros.clone(), "one_sided": zeros.clone(), "score": zeros.clone()}
    effect = b.mean(0).T                                   # [M, K]
    up = effect.clamp(min=0)
    one_sided = up / up.sum(0, keepdim=True).clamp(min=1e-300)
    moved = b.abs().sum(0).T
    consistency = torch.where(moved > 0, b.clamp(min=0).sum(0).T / moved.clamp(min=1e-300), torch.zeros_like(moved))
    score = s.clamp(min=0) * up * one_sided * r
    return {"effect": effect, "consistency": consistency, "one_sided": one_sided, "score": score}


def flag_shortcuts(score: torch.Tensor, threshold="otsu") -> dict:
    """Flag the candidates of ``score [M, K]``: ``threshold="otsu"`` splits the candidates with
    ``S > 0`` by Otsu's threshold and flags the upper side (most candidates are a garment's own
    parts with small scores; a shortcut's stand apart above them); a float in (0, 1] flags
    ``S >= threshold * max S``. Returns ``{"flagged" [M, K] bool, "cut"`` (the score cut),
    ``"separability"`` (of the Otsu split, None for a fraction)``}``."""
    s = _matrix(score, "score", 2)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("score: holds NaN or inf")
    positive = s > 0
    if not bool(positive.any()):
        return {"flagged": torch.zeros_like(positive), "cut": math.inf, "separability": None}
    if threshold == "otsu":
        candidates = s[positive]
        if candidates.numel() < 2:
            return {"flagged": positive, "cut": float(candidates.min()), "separability": None}
        cut = otsu_threshold(candidates)
        return {"flagged": positive & (s > cut), "cut": cut, "separability": separability(candidates, cut)}
    if isinstance(threshold, str):
        raise ValueError(f"shortcut_threshold: expected 'otsu' or a number in (0, 1], got {threshold!r}")
    frac = check_number(threshold, "shortcut_threshold", 0, 1, low_open=True)
    cut = frac * float(s.max())
    return {"flagged": positive & (s >= cut), "cut": cut, "separability": None}


def model_shortcuts(cls_presence: torch.Tensor, class_sizes: torch.Tensor, beta: torch.Tensor,
                    intensity: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor, names: list[str],
                    threshold="otsu", n_ranked: int = 10) -> tuple[dict, dict[str, torch.Tensor]]:
    """The whole reading: the JSON entry (``per_class``: each class's flagged prototypes with their
    evidence, highest score first; ``ranking``: the ``n_ranked`` best candidates over the model;
    ``score``: ``S`` as ``M`` lists of ``K`` numbers)
    and its tensors (``score``, ``skew``, ``effect``, ``one_sided``, ``concentration``,
    ``flagged``, each ``[M, K]``)."""
    m = len(names)
    sk = class_skew(cls_presence, class_sizes)
    conc = saliency_concentration(intensity, counts, labels, m)
    ev = shortcut_scores(sk["skew"], beta, conc)
    flag = flag_shortcuts(ev["score"], threshold)
    flagged = flag["flagged"]

    def entry(c: int, k: int) -> dict:
        return {"prototype": k, "class": c, "score": float(ev["score"][c, k]),
                "presence": float(sk["inside"][c, k]), "presence_other": float(sk["outside"][c, k]),
                "skew": float(sk["skew"][c, k]), "effect": float(ev["effect"][c, k]),
                "consistency": float(ev["consistency"][c, k]), "one_sided": float(ev["one_sided"][c, k]),
                "concentration": float(conc[c, k]), "flagged": bool(flagged[c, k]),
                "reason": (f"in {float(sk['inside'][c, k]):.0%} of {names[c]} and {float(sk['outside'][c, k]):.0%} of "
                           f"the other classes; raised {names[c]} (mean beta {float(ev['effect'][c, k]):+.3g}, "
                           f"{float(ev['one_sided'][c, k]):.0%} of its upward push); "
                           f"{float(conc[c, k]):.1f}x the saliency its area warrants")}

    per_class = []
    for c in range(m):
        ids = sorted(flagged[c].nonzero().flatten().tolist(), key=lambda k: (-float(ev["score"][c, k]), k))
        per_class.append({"class": c, "name": names[c], "flagged": [entry(c, k) for k in ids]})
    order = torch.argsort(-ev["score"].flatten(), stable=True)[: int(n_ranked)]
    k_count = ev["score"].shape[1]
    ranking = [entry(int(j) // k_count, int(j) % k_count) for j in order if float(ev["score"].flatten()[j]) > 0]
    data = {"formula": SHORTCUT_FORMULA, "regression": "pooled", "threshold": flag["cut"],
            "rule": "otsu over S > 0" if threshold == "otsu" else f"S >= {threshold} x max S",
            "separability": flag["separability"], "n_flagged": int(flagged.sum()),
            "classes_flagged": [c for c in range(m) if bool(flagged[c].any())],
            "prototypes_flagged": sorted({int(k) for k in flagged.nonzero()[:, 1].tolist()}),
            "per_class": per_class, "ranking": ranking,
            "score": [[float(v) for v in row] for row in ev["score"]]}
    tensors = {"score": ev["score"], "skew": sk["skew"].float(), "effect": ev["effect"].float(),
               "one_sided": ev["one_sided"].float(), "concentration": conc.float(), "flagged": flagged}
    return data, tensors
