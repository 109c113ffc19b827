"""Targets: the training samples the loop acts on, and the strategies they hand out as ordinary
torch data objects (``docs/curation.md``).

:func:`i2x.find_targets` (:mod:`i2x.loop.target_rule`) finds them from the analysis;
:func:`known_targets` builds them from regions known beforehand (an oracle). Either way::

    curated = targets.subset(train)              # exclude:    a torch Subset without the targets
    hidden = targets.perturbed(train, "fill")    # perturb:    a Dataset hiding the flagged cells
    moved = targets.transplanted(train)          # transplant: the flagged region pasted into the rival class
    sampler = targets.sampler(train)             # reweight:   a Sampler that shows the targets twice
    penalty = i2x.ExplanationPenalty(explainer, targets, weight=1.0)   # penalize: a loss term (i2x.loop.penalty)

and the controls without any explanation, built with the same budget: :meth:`Targets.random_subset`
(drop as many random samples of the pair, class by class), :meth:`Targets.pairup_sampler` and
:meth:`Targets.hard_sampler` (oversample all of the pair, or its lowest-margin samples, by the same
number of extra draws as ``sampler``). The data objects live in :mod:`i2x.loop.strategies`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from i2x._internal.checks import describe
from i2x.data import labels_of
from i2x.loop.strategies import (
    BatchedSubset,
    OversampleSampler,
    PerturbedDataset,
    TransplantedDataset,
    pixel_masks,
    transplant_rows,
)
from i2x.store import RunStore, RunStoreError, open_run, read_record

__all__ = ["Targets", "NothingToCurate", "known_targets", "save_targets", "load_targets", "TARGETS_SCHEMA"]


class NothingToCurate(ValueError):
    """The pair has no flagged prototype, or the rule selects no sample: nothing to target."""


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
    scope: ``"pair"`` (rows: the pair's samples) or ``"model"`` (``find_targets(scope="model")``:
    rows are every training sample, ``pair`` is None, a row's rival is its strongest other class).
    """

    pair: tuple[int, int] | None
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
    scope: str = "pair"

    @property
    def acted_classes(self) -> list[int]:
        """The classes the targets are drawn from: the pair, or every class with a row (model scope)."""
        if self.pair is not None:
            return list(self.pair)
        return sorted(int(c) for c in self.labels.unique())

    # -- what was chosen ---------------------------------------------------------------------

    @property
    def target_indices(self) -> torch.Tensor:
        """``[T]`` int64 dataset positions of the targets, ascending."""
        return self.indices[self.selected].sort().values

    def __len__(self) -> int:
        return int(self.selected.sum())

    def summary(self) -> dict:
        """Counts and shares flagged per class (JSON), the numbers a user checks first."""
        per_class = {}
        for c in self.acted_classes:
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
        out: dict[str, Any] = {"pair": None if self.pair is None else list(self.pair), "targets": len(self),
               "pair_samples": int(self.indices.numel()), "share": len(self) / max(1, int(self.indices.numel())),
               "per_class": per_class, "prototypes": self.prototypes, "rule": self.rule}
        if self.scope != "pair":
            out["scope"] = self.scope
        return out

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
        self.refuse_emptied_class(dataset, keep)
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
        for c in self.acted_classes:
            in_c = (self.labels == c).nonzero().flatten()
            k = int((self.selected & (self.labels == c)).sum())
            rows.append(in_c[torch.randperm(in_c.numel(), generator=g)[:k]])
        return torch.cat(rows).sort().values

    def perturbed(self, dataset, mode: str = "fill", seed: int = 0, dilate: int | None = None) -> PerturbedDataset:
        """``perturb``: every sample kept; in the targets the pixels under the flagged cells are
        replaced (``fill``: the mean of the image's own pixels around the region, ``noise``: that
        plus noise of their spread, ``blur``: a strong Gaussian blur of the image)."""
        self.check_dataset(dataset)
        rows = self.selected.nonzero().flatten()
        return PerturbedDataset(dataset, self.indices[rows], self.masks_for(rows, dilate), mode, seed)

    def transplanted(self, dataset, seed: int = 0, dilate: int | None = None) -> TransplantedDataset:
        """``transplant``: the flagged region of every target is pasted, at the same place, into a
        random non-target sample of another class (each recipient gets one), so the cue stops
        predicting the class it came from. Pair scope: the pair's other class, so the cue appears
        in both as often; model scope: any other class. The targets are kept as they are."""
        self.check_dataset(dataset)
        g = torch.Generator().manual_seed(int(seed))
        d_rows, r_rows = transplant_rows(self.labels, self.selected, self.acted_classes, g)
        if d_rows.numel() == 0:
            where = "the model" if self.pair is None else f"pair {self.pair}"
            raise NothingToCurate(f"transplant for {where}: no targets, or no non-target samples to paste into")
        return TransplantedDataset(dataset, self.indices[d_rows], self.indices[r_rows], self.masks_for(d_rows, dilate))

    def counterfactual(self, dataset, seed: int = 0) -> BatchedSubset:
        """The recipients of :meth:`transplanted`, alone: images of ``dataset`` that each carry a
        flagged region of another class's target, pasted at its place, under their own label. A
        model that still reads the cue answers the donor's class on them; one that does not keeps
        its answer. Built on held-out images (targets found on them), it is the counterfactual
        validation split :func:`i2x.experiment` decides its recommendation on."""
        moved = self.transplanted(dataset, seed=seed)
        return BatchedSubset(moved, moved.recipients.sort().values)

    def sampler(self, dataset, extra: int | None = None, seed: int = 0) -> OversampleSampler:
        """``reweight``: every sample once per epoch, the targets ``extra`` more times in all
        (default: each target once more), inserted at random places."""
        self.check_dataset(dataset)
        pool = self.target_indices
        return OversampleSampler(len(dataset), pool, len(pool) if extra is None else extra, seed)

    def pairup_sampler(self, dataset, extra: int | None = None, seed: int = 0) -> OversampleSampler:
        """Control: the same number of extra draws as :meth:`sampler`, from all the pair's samples."""
        self.check_dataset(dataset)
        return OversampleSampler(len(dataset), self.indices.sort().values, len(self) if extra is None else extra, seed,
                                 replacement=True)

    def hard_sampler(self, dataset, extra: int | None = None, seed: int = 0) -> OversampleSampler:
        """Control: the pair's ``extra`` samples with the smallest ``logit[true] - logit[rival]``
        (the model's errors first), each once more; ``extra`` defaults to the number of targets."""
        self.check_dataset(dataset)
        n = len(self) if extra is None else int(extra)
        rows = torch.argsort(self.margins, stable=True)[:n]
        return OversampleSampler(len(dataset), self.indices[rows].sort().values, rows.numel(), seed)

    def refuse_emptied_class(self, dataset, keep: torch.Tensor) -> None:
        """ValueError when keeping only the ``keep [len(dataset)]`` samples would leave a class of the
        pair with none of its targeted-pool samples (an exclusion arm would erase the class)."""
        for c in self.acted_classes:
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
        data = {"schema": TARGETS_SCHEMA, "schema_version": 1, "pair": None if self.pair is None else list(self.pair),
                "image_hw": list(self.image_hw), "classes": list(self.classes), "summary": self.summary(),
                "targets": self.target_indices.tolist()}
        if self.scope != "pair":  # version 2 adds the scope; a pair's file stays as version 1 wrote it
            data.update(schema_version=2, scope=self.scope)
        return data


_TENSORS = ("indices", "labels", "rivals", "scores", "shares", "margins", "predictions", "cell_masks", "selected")
TARGETS_SCHEMA = "i2x-targets"



# ----------------------------------------------------------------------------------------------
# Known beforehand, saved and loaded


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
        raise ValueError(f"pixel_masks: expected [{indices.numel()}, H, W] bool, got {describe(pixel_masks_)}")
    pos = torch.full((len(labels),), -1, dtype=torch.int64)
    pos[rows] = torch.arange(rows.numel())
    r = pos[indices]
    if bool((r < 0).any()):
        raise ValueError(f"indices: every known region must be in a sample of class {a} or {b}")
    hw = (pixel_masks_.shape[1], pixel_masks_.shape[2])
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


def save_targets(store: RunStore, targets: Targets) -> None:
    """``targets.safetensors`` first, then ``targets.json`` (both atomic)."""
    record = {"pair": None if targets.pair is None else list(targets.pair), "targets": len(targets),
              **({"scope": targets.scope} if targets.scope != "pair" else {})}
    store.write_tensors("targets", targets.to_tensors(), record=record)
    store.write_json("targets", targets.to_json(), record=record)


def load_targets(run) -> Targets:
    """Read the run's targets back."""
    store = open_run(run)
    if not (store.path / "targets.json").exists():
        raise FileNotFoundError(f"run {store.path} has no targets.json: run `i2x curate RUN --data NAME` "
                                "(i2x.find_targets) first")
    data = read_record(store.path / "targets.json", TARGETS_SCHEMA, "i2x targets")
    if data.get("schema_version", 1) not in (1, 2):
        raise RunStoreError(f"{store.path / 'targets.json'} has schema version {data.get('schema_version')!r}; this "
                            "i2x reads 1 and 2. Re-run find_targets.")
    if data.get("status") == "nothing_to_curate":
        raise NothingToCurate(str(data.get("message", f"nothing to curate for {tuple(data.get('pair') or ())}")))
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
    pair = None if data.get("pair") is None else tuple(data["pair"])
    return Targets(pair, s["prototypes"], t["indices"], t["labels"], t["rivals"], t["scores"],
                   t["shares"], t["margins"], t["predictions"], t["cell_masks"].bool(), selected, s["rule"],
                   tuple(data["image_hw"]), list(data["classes"]), scope=data.get("scope", "pair"))


