"""Stage 9 of I2X, first half: from flagged prototypes to targeted training samples, and the
strategies that act on them, as ordinary torch data objects.

:func:`find_targets` scores every training sample of a confused pair under the final model: its
layer features are assigned to the run's prototypes (the stored PCA and centroids, through the
compiled ``prototype_assign``), its GradCAM grids for both classes of the pair come from the
explainer, and for every flagged prototype the sample's **share** is the fraction of the CAM mass
on that prototype's cells. Each prototype's shares are split in two by Otsu's threshold; the
prototypes whose split is clean (they single out a group of samples rather than sit in all of
them) are kept, and the samples above a kept prototype's threshold, never more than a minority of
the pair, are the targets (``docs/curation.md`` has every rule and option).

The data objects live in ``i2x.strategies``, the loss term in ``i2x.penalty``.

The :class:`Targets` it returns hands out the strategies::

    targets = i2x.find_targets(run, model, train)
    curated = targets.subset(train)              # exclude:    a torch Subset without the targets
    hidden = targets.perturbed(train, "fill")    # perturb:    a Dataset hiding the flagged cells
    moved = targets.transplanted(train)          # transplant: the flagged region pasted into the rival class
    sampler = targets.sampler(train)             # reweight:   a Sampler that shows the targets twice
    penalty = i2x.ExplanationPenalty(explainer, targets, weight=1.0)   # penalize: a loss term (i2x.penalty)

and the controls without any explanation, built with the same budget: :meth:`Targets.random_subset`
(drop as many random samples of the pair, class by class), :meth:`Targets.pairup_sampler` and
:meth:`Targets.hard_sampler` (oversample all of the pair, or its lowest-margin samples, by the same
number of extra draws as ``sampler``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from ._util import check_int, check_number, describe as _describe, eval_mode, profiled
from .cam import Explainer, _strip_wrapper, run_device
from .data import labels_of, stratified_subset
from .store import RunStore, RunStoreError
from .streamed import batches_at, images_at
from .strategies import (BatchedSubset, OversampleSampler, PerturbedDataset, TransplantedDataset,
                         mass_share, pixel_masks, top_share)

__all__ = [
    "TARGET_DEFAULTS",
    "Targets",
    "NothingToCurate",
    "find_targets",
    "known_targets",
    "load_targets",
    "otsu_threshold",
    "separability",
]

#: The target rule's defaults (docs/curation.md says why each is what it is).
TARGET_DEFAULTS: dict = {
    "kinds": ("ambivalent", "decisive"),
    "score": "mass",          # "mass": share of CAM mass on flagged cells; "top": flagged share of the top-q cells
    "cam": "pair",            # "pair": the larger of the true and the rival class's share; "true": the true class only
    "top_q": 0.2,             # the top-q share of positions read by score="top"
    "weight": "none",         # "none", "margin" (2 sigmoid(-margin): near the boundary counts most), "error"
    "select": "separable",    # "separable": per flagged prototype, keep those whose scores split the pair cleanly;
                              # "union": one score over all flagged prototypes together
    "min_separability": 0.85, # Otsu's separability (between-class / total variance) a prototype needs ("separable")
    "threshold": "otsu",      # "otsu" (split of the pair's scores) or a float in [0, 1]
    "max_fraction": 0.5,      # never more than this share of the pair's samples
    "batch_size": 256,
}
SCORES = ("mass", "top")
SELECTS = ("separable", "union")
CAMS = ("pair", "true")
WEIGHTS = ("none", "margin", "error")


class NothingToCurate(ValueError):
    """The pair has no flagged prototype, or the rule selects no sample: nothing to target."""


# ----------------------------------------------------------------------------------------------
# The rule's pieces (pure functions over tensors)


def otsu_threshold(scores: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of 1-D scores: the cut that maximises the between-class variance of the
    two sides (a histogram of ``bins`` bins over the scores' range). Constant scores -> their value."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if s.numel() == 0:
        raise ValueError("otsu_threshold: no scores")
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        return hi
    hist = torch.histc(s, bins=bins, min=lo, max=hi)
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centres).cumsum(0)
    mu0 = m0 / w0.clamp(min=1)
    mu1 = (m0[-1] - m0) / w1.clamp(min=1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(between[:-1].argmax())
    return lo + (k + 1) * (hi - lo) / bins  # the upper edge of the last bin kept below the cut


def separability(scores: torch.Tensor, threshold: float) -> float:
    """Otsu's effectiveness of a split: the between-class variance of the two sides over the total
    variance, in [0, 1]. About 0.64 for normal scores and 0.75 for uniform ones (no natural group);
    near 1 when the scores fall into two tight groups (a cue some samples carry and others lack)."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    total = float(s.var(unbiased=False)) if s.numel() > 1 else 0.0
    hi = s > threshold
    if total == 0.0 or bool(hi.all()) or not bool(hi.any()):
        return 0.0
    w1 = float(hi.double().mean())
    gap = float(s[hi].mean() - s[~hi].mean())
    return w1 * (1 - w1) * gap * gap / total


# ----------------------------------------------------------------------------------------------
# Targets


@dataclass
class Targets:
    """The scored samples of a pair and the ones chosen, with what each strategy needs.

    Rows are the training samples of the pair's two classes, in dataset order:

    pair: ``(a, b)`` class indices; prototypes: the flagged prototypes used, each a dict with
    ``prototype``, ``kind`` (``ambivalent`` / ``decisive``), ``score``, ``reason``.
    indices ``[R]`` int64: dataset positions; labels ``[R]``; rivals ``[R]``: the other class of the pair.
    scores ``[R]`` float32: the target score; shares ``[R]`` float32: the CAM share before weighting.
    margins ``[R]`` float32: ``logit[true] - logit[rival]`` under the final model; predictions ``[R]``.
    cell_masks ``[R, h, w]`` bool: positions assigned to a flagged prototype.
    selected ``[R]`` bool: the targets. pixel_override: ``[R, H, W]`` bool masks that replace the
    upsampled cells (an oracle built from known regions), or None.
    rule: the rule's options and the threshold it used (JSON). image_hw: ``(H, W)``.
    """

    pair: tuple[int, int]
    prototypes: list[dict]
    indices: torch.Tensor
    labels: torch.Tensor
    rivals: torch.Tensor
    scores: torch.Tensor
    shares: torch.Tensor
    margins: torch.Tensor
    predictions: torch.Tensor
    cell_masks: torch.Tensor
    selected: torch.Tensor
    rule: dict
    image_hw: tuple[int, int]
    classes: list[str] = field(default_factory=list)
    pixel_override: torch.Tensor | None = None

    # -- what was chosen ---------------------------------------------------------------------

    @property
    def target_indices(self) -> torch.Tensor:
        """``[T]`` int64 dataset positions of the targets, ascending."""
        return self.indices[self.selected].sort().values

    def __len__(self) -> int:
        return int(self.selected.sum())

    def summary(self) -> dict:
        """Counts and shares flagged per class (JSON), the numbers a user checks first."""
        a, b = self.pair
        per_class = {}
        for c in (a, b):
            in_c = self.labels == c
            n = int(in_c.sum())
            k = int((self.selected & in_c).sum())
            wrong = in_c & (self.predictions != c)
            per_class[str(c)] = {
                "name": self.classes[c] if self.classes else str(c), "samples": n, "targets": k,
                "share": k / n if n else 0.0, "errors": int(wrong.sum()),
                "errors_targeted": int((wrong & self.selected).sum()),
                "mean_margin_targets": float(self.margins[self.selected & in_c].mean()) if k else None,
                "mean_margin_class": float(self.margins[in_c].mean()) if n else None,
            }
        return {"pair": list(self.pair), "targets": len(self), "pair_samples": int(self.indices.numel()),
                "share": len(self) / max(1, int(self.indices.numel())), "per_class": per_class,
                "prototypes": self.prototypes, "rule": self.rule}

    def masks_for(self, rows: torch.Tensor, dilate: int | None = None) -> torch.Tensor:
        """Pixel masks ``[len(rows), H, W]`` bool of the flagged cells of these rows."""
        if self.pixel_override is not None:
            return self.pixel_override[rows]
        if dilate is None:
            dilate = self.default_dilate
        return pixel_masks(self.cell_masks[rows], self.image_hw, dilate)

    @property
    def default_dilate(self) -> int:
        """Half a cell, in pixels: a cell's feature responds to a little beyond its own pixels."""
        h, w = self.cell_masks.shape[1:]
        return int(math.ceil(max(self.image_hw[0] / h, self.image_hw[1] / w) / 2))

    def _rows_of(self, dataset_indices: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(self.indices)
        pos = torch.searchsorted(self.indices[order], dataset_indices)
        pos = pos.clamp(max=self.indices.numel() - 1)
        rows = order[pos]
        if not bool((self.indices[rows] == dataset_indices).all()):
            raise ValueError("indices that are not samples of the pair")
        return rows

    def check_dataset(self, dataset) -> None:
        """The dataset must be the one the targets were scored on: same length class by class at
        the targets' positions."""
        n = len(dataset)
        if self.indices.numel() and int(self.indices.max()) >= n:
            raise ValueError(f"dataset has {n} samples but the targets refer to index {int(self.indices.max())}; "
                             "pass the training set the targets were found on")
        labels = labels_of(dataset)[self.indices]
        if not bool((labels == self.labels).all()):
            bad = int((labels != self.labels).sum())
            raise ValueError(f"dataset: {bad} of the pair's {self.indices.numel()} samples have other labels than "
                             "when the targets were found; pass the same training set")

    # -- strategies --------------------------------------------------------------------------

    def subset(self, dataset) -> Subset:
        """``exclude``: the dataset without the targets, as a ``torch.utils.data.Subset`` (ascending)."""
        self.check_dataset(dataset)
        keep = torch.ones(len(dataset), dtype=torch.bool)
        keep[self.target_indices] = False
        self._refuse_emptied_class(dataset, keep)
        return BatchedSubset(dataset, keep.nonzero().flatten())

    def random_subset(self, dataset, seed: int = 0) -> Subset:
        """Control for ``exclude``: drop as many random samples of each class of the pair as the
        targets hold of it (seeded), and nothing else."""
        self.check_dataset(dataset)
        drop = self.random_rows(seed)
        keep = torch.ones(len(dataset), dtype=torch.bool)
        keep[self.indices[drop]] = False
        return BatchedSubset(dataset, keep.nonzero().flatten())

    def random_rows(self, seed: int = 0) -> torch.Tensor:
        """Rows of random samples, as many per class as there are targets of that class."""
        g = torch.Generator().manual_seed(int(seed))
        rows = []
        for c in self.pair:
            in_c = (self.labels == c).nonzero().flatten()
            k = int((self.selected & (self.labels == c)).sum())
            rows.append(in_c[torch.randperm(in_c.numel(), generator=g)[:k]])
        return torch.cat(rows).sort().values

    def perturbed(self, dataset, mode: str = "fill", seed: int = 0, dilate: int | None = None) -> "PerturbedDataset":
        """``perturb``: every sample kept; in the targets the pixels under the flagged cells are
        replaced (``fill``: the mean of the image's own pixels around the region, ``noise``: that
        plus noise of their spread, ``blur``: a strong Gaussian blur of the image)."""
        self.check_dataset(dataset)
        rows = self.selected.nonzero().flatten()
        return PerturbedDataset(dataset, self.indices[rows], self.masks_for(rows, dilate), mode, seed)

    def transplanted(self, dataset, seed: int = 0, dilate: int | None = None) -> "TransplantedDataset":
        """``transplant``: the flagged region of every target is pasted, at the same place, into a
        random non-target sample of the pair's other class (each recipient gets one), so the cue
        appears in both classes as often and stops predicting either. The targets are kept as they are."""
        self.check_dataset(dataset)
        g = torch.Generator().manual_seed(int(seed))
        donors, recipients = [], []
        for c in self.pair:
            rival = self.pair[1] if c == self.pair[0] else self.pair[0]
            d_rows = (self.selected & (self.labels == c)).nonzero().flatten()
            pool = ((~self.selected) & (self.labels == rival)).nonzero().flatten()
            if d_rows.numel() == 0 or pool.numel() == 0:
                continue
            pool = pool[torch.randperm(pool.numel(), generator=g)]
            if d_rows.numel() > pool.numel():  # more donors than recipients: each recipient takes one
                d_rows = d_rows[torch.randperm(d_rows.numel(), generator=g)[:pool.numel()]]
            donors.append(d_rows)
            recipients.append(pool[:d_rows.numel()])
        if not donors:
            raise NothingToCurate(f"transplant for pair {self.pair}: no targets, or no non-target samples to paste into")
        d_rows, r_rows = torch.cat(donors), torch.cat(recipients)
        return TransplantedDataset(dataset, self.indices[d_rows], self.indices[r_rows], self.masks_for(d_rows, dilate))

    def sampler(self, dataset, extra: int | None = None, seed: int = 0) -> "OversampleSampler":
        """``reweight``: every sample once per epoch, the targets ``extra`` more times in all
        (default: each target once more), inserted at random places."""
        self.check_dataset(dataset)
        pool = self.target_indices
        return OversampleSampler(len(dataset), pool, len(pool) if extra is None else extra, seed)

    def pairup_sampler(self, dataset, extra: int | None = None, seed: int = 0) -> "OversampleSampler":
        """Control: the same number of extra draws as :meth:`sampler`, from all the pair's samples."""
        self.check_dataset(dataset)
        return OversampleSampler(len(dataset), self.indices.sort().values, len(self) if extra is None else extra, seed,
                                 replacement=True)

    def hard_sampler(self, dataset, extra: int | None = None, seed: int = 0) -> "OversampleSampler":
        """Control: the pair's ``extra`` samples with the smallest ``logit[true] - logit[rival]``
        (the model's errors first), each once more; ``extra`` defaults to the number of targets."""
        self.check_dataset(dataset)
        n = len(self) if extra is None else int(extra)
        rows = torch.argsort(self.margins, stable=True)[:n]
        return OversampleSampler(len(dataset), self.indices[rows].sort().values, rows.numel(), seed)

    def _refuse_emptied_class(self, dataset, keep: torch.Tensor) -> None:
        for c in self.pair:
            if not bool((self.labels == c).any()):
                continue
            if not bool((self.labels[keep[self.indices]] == c).any()):
                name = self.classes[c] if self.classes else str(c)
                raise ValueError(f"excluding the targets would remove every sample of class {c} ({name}); "
                                 "lower max_fraction or use another strategy")

    # -- on disk -----------------------------------------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        t = {name: getattr(self, name).contiguous() for name in _TENSORS}
        t["cell_masks"] = self.cell_masks.to(torch.uint8).contiguous()
        t["selected"] = self.selected.to(torch.uint8).contiguous()
        return t

    def to_json(self) -> dict:
        return {"schema": TARGETS_SCHEMA, "schema_version": 1, "pair": list(self.pair), "image_hw": list(self.image_hw),
                "classes": list(self.classes), "summary": self.summary(),
                "targets": self.target_indices.tolist()}


_TENSORS = ("indices", "labels", "rivals", "scores", "shares", "margins", "predictions", "cell_masks", "selected")
TARGETS_SCHEMA = "i2x-targets"


# ----------------------------------------------------------------------------------------------
# Finding them


def known_targets(train_dataset, pair: tuple[int, int], indices, pixel_masks_: torch.Tensor, grid: tuple[int, int],
                  classes: Sequence[str] = ()) -> Targets:
    """Targets from regions known beforehand (an oracle: where a planted mark was drawn).

    indices ``[T]``: dataset positions of the samples that carry the region; pixel_masks_
    ``[T, H, W]`` bool: the region in each. The strategies then act on exactly these pixels.
    """
    a, b = sorted(int(v) for v in pair)
    labels = labels_of(train_dataset)
    rows = ((labels == a) | (labels == b)).nonzero().flatten()
    indices = torch.as_tensor(indices, dtype=torch.int64)
    if pixel_masks_.dim() != 3 or pixel_masks_.shape[0] != indices.numel():
        raise ValueError(f"pixel_masks: expected [{indices.numel()}, H, W] bool, got {_describe(pixel_masks_)}")
    pos = torch.full((len(labels),), -1, dtype=torch.int64)
    pos[rows] = torch.arange(rows.numel())
    r = pos[indices]
    if bool((r < 0).any()):
        raise ValueError(f"indices: every known region must be in a sample of class {a} or {b}")
    hw = tuple(pixel_masks_.shape[1:])
    override = torch.zeros(rows.numel(), *hw, dtype=torch.bool)
    override[r] = pixel_masks_.bool()
    selected = torch.zeros(rows.numel(), dtype=torch.bool)
    selected[r] = True
    cells = F.adaptive_max_pool2d(override[:, None].float(), grid)[:, 0] > 0
    y = labels[rows]
    rivals = torch.where(y == a, torch.full_like(y, b), torch.full_like(y, a))
    zeros = torch.zeros(rows.numel())
    return Targets((a, b), [{"prototype": -1, "kind": "known", "score": None, "reason": "known regions (oracle)"}],
                   rows, y, rivals, selected.float(), selected.float(), zeros, y.clone(), cells, selected,
                   {"rule": "known regions"}, hw, list(classes), override)


def _check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(TARGET_DEFAULTS))
    if unknown:
        raise TypeError(f"find_targets: unknown options {unknown}; known: {sorted(TARGET_DEFAULTS)}")
    o = {**TARGET_DEFAULTS, **options}
    o["kinds"] = tuple(o["kinds"])
    bad = sorted(set(o["kinds"]) - {"ambivalent", "decisive"})
    if bad or not o["kinds"]:
        raise ValueError(f"kinds: expected 'ambivalent' and/or 'decisive', got {list(o['kinds'])}")
    for name, allowed in (("score", SCORES), ("cam", CAMS), ("weight", WEIGHTS), ("select", SELECTS)):
        if o[name] not in allowed:
            raise ValueError(f"{name}: expected one of {list(allowed)}, got {o[name]!r}")
    if o["threshold"] != "otsu":
        o["threshold"] = check_number(o["threshold"], "threshold (or 'otsu')", 0, 1)
    o["min_separability"] = check_number(o["min_separability"], "min_separability", 0, 1)
    for name in ("top_q", "max_fraction"):
        o[name] = check_number(o[name], name, 0, 1, low_open=True)
    o["batch_size"] = check_int(o["batch_size"], "batch_size")
    return o


def _open(run) -> RunStore:
    if isinstance(run, RunStore):
        return run
    return RunStore.open(run)


def _flagged(analysis, a: int, b: int, kinds, prototypes) -> list[dict]:
    if prototypes is not None:
        return [{"prototype": int(k), "kind": "given", "score": None, "reason": "given by the caller"}
                for k in prototypes]
    return analysis.flagged_prototypes(a, b, kinds)


@profiled("i2x::find_targets")
def find_targets(run, model: nn.Module, train_dataset, pairs=None, prototypes: Sequence[int] | None = None,
                 device=None, progress: bool = False, save: bool = True, probe_dataset=None, *,
                 num_workers: int = 0, pin_memory: bool = False, **options) -> Targets:
    """Score every training sample of a confused pair and choose the targets.

    Args:
        run: a run folder (or ``RunStore``) with prototypes and an analysis.
        model: the final model of the run (its layer must be the run's; it is not modified:
            BatchNorm statistics are recomputed on the run's calibration images for the scoring
            and put back, modes restored, no ``.grad`` touched).
        train_dataset: the training set the probe was drawn from: any map-style Dataset of
            ``(image, label)`` items (a torchvision dataset, ``TensorDataset``, ``ImageFolder``, a
            ``Subset``). Its images are read a batch at a time through a ``DataLoader``, never all
            held; an ``i2x.data.ImageDataset`` is indexed directly.
        pairs: ``[(a, b)]`` (one pair; default: the analysis' most-confused pair).
        prototypes: the prototype ids to target (default: the pair's flagged ones of ``kinds``).
        device: where the scoring runs (default: the model's).
        save: write ``targets.safetensors`` + ``targets.json`` into the run.
        probe_dataset: the dataset the run's probe indices refer to, for the tracker's BatchNorm
            calibration images (default: ``train_dataset``; give it when the probe came from another split).
        num_workers, pin_memory: the DataLoader's, for reading ``train_dataset`` (and
            ``probe_dataset``).
        options: the rule (:data:`TARGET_DEFAULTS`): kinds, select, min_separability, score,
            cam, top_q, weight, threshold, max_fraction, batch_size.

    Raises:
        NothingToCurate: the pair has no flagged prototype, or no sample clears the rule.
        ValueError: the run lacks prototypes or an analysis, or the model / dataset do not match it.
    """
    from .analysis import load_analysis
    from .prototypes import Prototypes
    from .track import recalibrated_batchnorm

    o = _check_options(options)
    store = _open(run)
    if save:
        store.lock_for_writing()  # refuse now, not after scoring, when another process writes the run
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {_describe(model)}")
    if not (store.path / "prototypes.safetensors").exists():
        raise ValueError(f"run {store.path} has no prototypes: finish the tracker (or run fit_prototypes) first")
    if not (store.path / "analysis.json").exists():
        raise ValueError(f"run {store.path} has no analysis: run i2x.analyze first")
    analysis = load_analysis(store)
    protos = Prototypes.from_tensors(store.read_tensors("prototypes"))
    a, b = _choose_pair(analysis, pairs, store.num_classes)
    flagged = _flagged(analysis, a, b, o["kinds"], prototypes)
    names = store.classes
    if not flagged:
        _nothing(store, save, a, b, f"the analysis flagged no {' or '.join(o['kinds'])} prototype for this pair")
    ids = torch.tensor([p["prototype"] for p in flagged], dtype=torch.int64)
    if int(ids.min()) < 0 or int(ids.max()) >= protos.n_prototypes:
        raise ValueError(f"prototypes: expected ids in [0, {protos.n_prototypes}), got {ids.tolist()}")

    labels = labels_of(train_dataset)
    if int(labels.max()) >= store.num_classes:
        raise ValueError(f"train_dataset has label {int(labels.max())} but the run has {store.num_classes} classes")
    rows = ((labels == a) | (labels == b)).nonzero().flatten()
    if rows.numel() == 0:
        raise ValueError(f"train_dataset has no sample of class {a} or {b}")

    module = _strip_wrapper(model)
    layer = store.manifest["model"]["layer"]
    explainer = Explainer(module, layer, method=store.manifest["model"].get("method", "gradcam"))
    device = run_device(module, device)
    workers = check_int(num_workers, "num_workers", minimum=0)
    reading = {"num_workers": workers, "pin_memory": bool(pin_memory)}
    calibration = (_calibration_images(store, train_dataset, reading, labels) if probe_dataset is None
                   else _calibration_images(store, probe_dataset, reading))
    grid = tuple(store.grid) if store.grid else None

    out = {k: [] for k in ("share", "margin", "pred", "assignment")}
    bar = _progress(rows.numel(), progress, f"targets for {_pair_label(store, a, b)}")
    with recalibrated_batchnorm(module, calibration, device), eval_mode(module):
        for start, x in batches_at(train_dataset, rows, o["batch_size"], **reading):
            y = labels[rows[start:start + x.shape[0]]]
            res = _score_batch(explainer, protos, x.to(device), y.to(device), a, b, ids.to(device), o, grid)
            for k, v in res.items():
                out[k].append(v.cpu())
            bar.update(x.shape[0])
    bar.close()
    shares = torch.cat(out["share"]).float()  # [R, F + 1]
    margins = torch.cat(out["margin"]).float()
    preds = torch.cat(out["pred"])
    assignment = torch.cat(out["assignment"]).long()
    y = labels[rows]
    rivals = torch.where(y == a, torch.full_like(y, b), torch.full_like(y, a))
    weighted = shares * _weights(margins, preds, y, o["weight"])[:, None]
    if o["select"] == "separable":
        kept, selected, scores, stats = _select_separable(weighted[:, :-1], ids, o)
        share = shares[:, :-1][:, kept].max(1).values
        used = ids[kept]
        threshold = None
    else:
        scores, share, used, stats = weighted[:, -1], shares[:, -1], ids, None
        selected, threshold = _select(scores, o["threshold"])
    if not bool(selected.any()):
        _nothing(store, save, a, b, "no sample's target score clears the rule's threshold")
    selected, threshold = _cap(selected, scores, o["max_fraction"], threshold)
    for p in flagged:
        p["used"] = p["prototype"] in used.tolist()
        if stats is not None:
            p.update(stats[p["prototype"]])
    rule = {**o, "kinds": list(o["kinds"]), "threshold_used": threshold, "prototypes_used": used.tolist(),
            "fallback": bool(stats is not None and not any(v["separable"] for v in stats.values()))}
    masks = torch.isin(assignment, used)
    targets = Targets((a, b), flagged, rows, y, rivals, scores.float(), share.float(), margins, preds, masks, selected,
                      rule, tuple(x.shape[-2:]), list(names))
    if save:
        save_targets(store, targets)
    return targets


def _pair_label(store: RunStore, a: int, b: int) -> str:
    names = store.classes
    named = (names[a], names[b]) != (str(a), str(b))
    return f"({a}, {b})" + (f" = ({names[a]}, {names[b]})" if named else "")


def _nothing(store: RunStore, save: bool, a: int, b: int, why: str) -> None:
    """Raise NothingToCurate; with ``save`` the run's targets say so too, so an experiment cannot
    pick up targets an earlier call left for another pair or rule."""
    message = f"nothing to curate for {_pair_label(store, a, b)}: {why}"
    if save:
        store.write_json("targets", {"schema": TARGETS_SCHEMA, "schema_version": 1, "status": "nothing_to_curate",
                                     "pair": [a, b], "message": message},
                         record={"pair": [a, b], "targets": 0})
        stale = store.path / "targets.safetensors"
        if stale.exists():
            stale.unlink()
    raise NothingToCurate(message)


def _choose_pair(analysis, pairs, m: int) -> tuple[int, int]:
    if pairs is None:
        if not analysis.data["uncertainty"]:
            raise ValueError("the analysis has no confused pair (n_pairs=0?); pass pairs=[(a, b)]")
        a, b = analysis.data["uncertainty"][0]["pair"]
        return int(a), int(b)
    pairs = list(pairs)
    if len(pairs) != 1 or len(pairs[0]) != 2:
        raise ValueError(f"pairs: expected one pair [(a, b)], got {pairs!r}")
    a, b = (int(v) for v in pairs[0])
    if not (0 <= a < m and 0 <= b < m) or a == b:
        raise ValueError(f"pairs: expected two different classes in [0, {m}), got ({a}, {b})")
    if analysis.uncertainty(a, b) is None:
        raise ValueError(f"pair ({a}, {b}) was not analysed (analysis pairs: "
                         f"{[u['pair'] for u in analysis.data['uncertainty']]}); re-run analyze with more n_pairs")
    return min(a, b), max(a, b)


def _calibration_images(store: RunStore, dataset, reading: dict, labels: torch.Tensor | None = None):
    """The tracker's BatchNorm calibration images: the same stratified subset of the probe (a
    tensor, or a view read through a DataLoader for a dataset that does not hold its tensors)."""
    n = int(store.manifest.get("options", {}).get("recalibrate_bn", 0) or 0)
    if n == 0:
        return None
    probe_idx, probe_labels = store.probe()
    chosen = probe_idx[stratified_subset(probe_labels, min(n, probe_idx.numel()), seed=0)]
    if int(probe_idx.max()) >= len(dataset):
        raise ValueError(f"the dataset has {len(dataset)} samples but the run's probe refers to index "
                         f"{int(probe_idx.max())}; pass the training set the run was tracked on (or probe_dataset=)")
    expected = probe_labels[stratified_subset(probe_labels, min(n, probe_idx.numel()), seed=0)]
    labels = labels_of(dataset) if labels is None else labels  # the caller's, when it read them already
    if not bool((labels[chosen] == expected).all()):
        split = store.manifest.get("dataset", {}).get("split")
        raise ValueError(f"the dataset's labels at the run's probe positions differ from the probe's (the probe came "
                         f"from the {split or 'unknown'} split); pass the dataset the probe was drawn from as probe_dataset=")
    return images_at(dataset, chosen, **reading)


def _score_batch(explainer, protos, x, y, a, b, ids, o, grid):
    rival = torch.where(y == a, torch.full_like(y, b), torch.full_like(y, a))
    with torch.enable_grad(), explainer.capture() as captured:
        logits = explainer.model(x)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model's output holds NaN or inf on the training samples; is it the run's final model?")
    cam_true = explainer.explain_from(captured, logits, y)
    cam_rival = explainer.explain_from(captured, logits, rival)
    features = explainer._to_grid(captured.activations[0].detach(), explainer.layer_names[0])
    if grid is not None and tuple(features.shape[-2:]) != grid:
        raise ValueError(f"layer grid is {tuple(features.shape[-2:])} but the run's is {grid}: the model or input "
                         "size does not match the run")
    if features.shape[1] != protos.mean.shape[0]:
        raise ValueError(f"layer has {features.shape[1]} channels but the run's prototypes were fitted on "
                         f"{protos.mean.shape[0]}: the model does not match the run")
    assignment = protos.assign(features.float())
    # Column j < F: prototype ids[j] alone; column F: all flagged prototypes together.
    masks = [assignment == k for k in ids.tolist()] + [torch.isin(assignment, ids)]
    shares = []
    for mask in masks:
        share = _share(cam_true.detach(), mask, o)
        if o["cam"] == "pair":
            share = torch.maximum(share, _share(cam_rival.detach(), mask, o))
        shares.append(share)
    logits = logits.detach().float()
    margin = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, rival[:, None])[:, 0]
    return {"share": torch.stack(shares, 1), "margin": margin, "pred": logits.argmax(1),
            "assignment": assignment.to(torch.int16)}


def _share(cam, mask, o):
    return mass_share(cam, mask) if o["score"] == "mass" else top_share(cam, mask, o["top_q"])


def _weights(margins, preds, labels, kind: str) -> torch.Tensor:
    if kind == "none":
        return torch.ones_like(margins)
    if kind == "margin":
        return 2 * torch.sigmoid(-margins)
    return (preds != labels).float()


def _select(scores: torch.Tensor, threshold) -> tuple[torch.Tensor, float]:
    """Samples whose score clears the threshold (Otsu's split, or a given value); never a zero score."""
    thr = otsu_threshold(scores) if threshold == "otsu" else float(threshold)
    selected = scores > thr if threshold == "otsu" else scores >= thr
    return selected & (scores > 0), float(thr)


def _select_separable(shares: torch.Tensor, ids: torch.Tensor, o: dict):
    """Per flagged prototype: its own split of the pair's scores and how clean it is. The
    prototypes whose split clears ``min_separability`` are kept (the most separable one alone when
    none does: recorded as the rule's fallback); a sample is a target when any kept prototype's
    score clears that prototype's threshold. Returns (kept columns, selected, score, stats)."""
    stats, picks, seps = {}, [], []
    for j, k in enumerate(ids.tolist()):
        sel, thr = _select(shares[:, j], o["threshold"])
        sep = separability(shares[:, j], thr)
        seps.append(sep)
        picks.append(sel)
        stats[k] = {"separability": sep, "threshold": thr, "selects": int(sel.sum()),
                    "separable": sep >= o["min_separability"]}
    order = sorted((j for j, k in enumerate(ids.tolist()) if stats[k]["separable"]), key=lambda j: (-seps[j], j))
    if not order:
        order = [max(range(len(seps)), key=lambda j: (seps[j], -j))]
    # Most separable first; a prototype whose group would push the targets past max_fraction of
    # the pair is left out (two prototypes that split the pair into complementary halves, e.g. a
    # mark and the plain corner where it is missing, would otherwise leave the choice to the cap).
    cap = int(math.floor(o["max_fraction"] * shares.shape[0]))
    kept, selected = [], torch.zeros(shares.shape[0], dtype=torch.bool)
    for j in order:
        union = selected | picks[j]
        if kept and int(union.sum()) > cap:
            stats[int(ids[j])]["left_out"] = "its targets would exceed max_fraction of the pair"
            continue
        kept.append(j)
        selected = union
    scores = shares[:, kept].max(1).values
    return torch.tensor(kept, dtype=torch.int64), selected, scores, stats


def _cap(selected: torch.Tensor, scores: torch.Tensor, max_fraction: float, threshold):
    """Never more than ``max_fraction`` of the pair: the highest scores are kept (ties to the lower row)."""
    cap = int(math.floor(max_fraction * scores.numel()))
    if int(selected.sum()) <= cap:
        return selected, threshold
    candidates = torch.where(selected, scores, torch.full_like(scores, -math.inf))
    order = torch.argsort(-candidates, stable=True)[:cap]
    capped = torch.zeros_like(selected)
    capped[order] = True
    return capped, (float(scores[order[-1]]) if cap else math.inf)


def _progress(total: int, enabled: bool, desc: str):
    from ._progress import bar

    return bar(total=total, desc=desc, unit="sample", enabled=enabled)


def save_targets(store: RunStore, targets: Targets) -> None:
    """``targets.safetensors`` first, then ``targets.json`` (both atomic)."""
    record = {"pair": list(targets.pair), "targets": len(targets)}
    store.write_tensors("targets", targets.to_tensors(), record=record)
    store.write_json("targets", targets.to_json(), record=record)


def load_targets(run) -> Targets:
    """Read the run's targets back."""
    store = _open(run)
    if not (store.path / "targets.json").exists():
        raise FileNotFoundError(f"run {store.path} has no targets.json: run i2x.find_targets (i2x curate) first")
    data = store.read_json("targets")
    if not isinstance(data, dict) or data.get("schema") != TARGETS_SCHEMA:
        raise RunStoreError(f"{store.path / 'targets.json'} is not i2x targets (schema is not {TARGETS_SCHEMA!r})")
    if data.get("status") == "nothing_to_curate":
        raise NothingToCurate(str(data.get("message", f"nothing to curate for {tuple(data.get('pair', ()))}")))
    if not (store.path / "targets.safetensors").exists():
        raise RunStoreError(f"run {store.path} has targets.json but no targets.safetensors; re-run find_targets")
    t = store.read_tensors("targets", required=_TENSORS)
    n = t["indices"].numel()
    if any(t[k].shape[0] != n for k in _TENSORS):
        raise RunStoreError(f"{store.path / 'targets.safetensors'}: tensors of different lengths; re-run find_targets")
    selected = t["selected"].bool()
    if sorted(t["indices"][selected].tolist()) != sorted(data["targets"]):
        raise RunStoreError(f"{store.path}: targets.json and targets.safetensors disagree; re-run find_targets")
    s = data["summary"]
    return Targets(tuple(data["pair"]), s["prototypes"], t["indices"], t["labels"], t["rivals"], t["scores"],
                   t["shares"], t["margins"], t["predictions"], t["cell_masks"].bool(), selected, s["rule"],
                   tuple(data["image_hw"]), list(data["classes"]))


