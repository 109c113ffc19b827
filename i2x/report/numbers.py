"""The numbers behind the report's figures: small functions of a run (or of tensors) that can be
checked on their own."""

from __future__ import annotations

import torch

from i2x._internal.modules import layer_output_shape
from i2x.analysis import readings
from i2x.analysis.readings import assignment_counts, class_presence
from i2x.data import DATASET_INFO
from i2x.models import rebuild_model
from i2x.store import RunStore, RunStoreError, open_run
from i2x.track.prototypes import read_prototypes

__all__ = ["confusion_matrices", "probe_accuracy", "prototype_presence", "patch_box", "exemplar_patches",
           "exemplar_patches_at", "image_size", "run_probs"]


def run_probs(store: RunStore) -> tuple[list[int], torch.Tensor]:
    steps = store.finished_steps()
    if not steps:
        raise RunStoreError(f"run {store.path} has no finished checkpoints yet")
    return steps, torch.stack([store.load_checkpoint(s)["probs"] for s in steps])


def confusion_matrices(run) -> tuple[list[int], torch.Tensor]:
    """``(steps, hard [T, M, M] int64)``: at every finished checkpoint, ``hard[t, a, b]`` counts the
    probe samples of class a the model predicted as b (argmax of the stored softmax)."""
    store = open_run(run)
    steps, probs = run_probs(store)
    hard, _ = readings.confusion_matrices(probs, store.probe_labels())
    return steps, hard


def probe_accuracy(run) -> tuple[list[int], torch.Tensor]:
    """``(steps, accuracy [T] float64)`` of the stored softmax on the probe set."""
    store = open_run(run)
    steps, probs = run_probs(store)
    return steps, (probs.argmax(dim=2) == store.probe_labels()).double().mean(dim=1)


def prototype_presence(assignment: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:
    """``[M, K]`` float64: the share of each class's probe samples that have at least one grid
    position assigned to each prototype (0 for a class without samples)."""
    return class_presence(assignment_counts(assignment, k), labels, num_classes)


def patch_box(row: int, col: int, grid: tuple[int, int], image_hw: tuple[int, int], context: int = 1):
    """``(top, left, height, width)`` in pixels of the patch an exemplar at grid cell (row, col)
    stands for: the cell's pixels grown by ``context`` cells on every side (a cell's feature sees
    beyond its own pixels), shifted, not cut, where it would leave the image, so that every patch
    of a run has the same size."""
    (h, w), (big_h, big_w) = grid, image_hw

    def span(i: int, cells: int, pixels: int) -> tuple[int, int]:
        start = (i - context) * pixels // cells
        stop = -(-(i + 1 + context) * pixels // cells)  # ceil
        size = min(pixels, stop - start)
        return min(max(0, start), pixels - size), size

    (top, height), (left, width) = span(int(row), h, big_h), span(int(col), w, big_w)
    return top, left, height, width


def exemplar_patches_at(exemplars: torch.Tensor, probe_indices: torch.Tensor, images: torch.Tensor, grid, k: int,
                        context: int) -> list[dict]:
    """:func:`exemplar_patches` from tensors already loaded: ``exemplars [K, E, 3]`` (probe row, grid
    row, grid column; row -1 pads), the probe's dataset indices and the dataset's ``images``."""
    out = []
    for sample, row, col in exemplars[k].tolist():
        if sample < 0:  # padding of a prototype with fewer positions than exemplars
            continue
        index = int(probe_indices[sample])
        top, left, height, width = patch_box(row, col, grid, (images.shape[-2], images.shape[-1]), context)
        out.append({"sample": sample, "dataset_index": index, "row": row, "col": col,
                    "box": (top, left, height, width),
                    "patch": images[index][:, top:top + height, left:left + width]})
    return out


def exemplar_patches(run, dataset, prototype: int, context: int = 1) -> list[dict]:
    """The stored exemplars of ``prototype``, nearest first, each as ``{"sample"`` (probe row),
    ``"dataset_index"``, ``"row"``, ``"col"`` (grid cell), ``"box"`` (:func:`patch_box`), ``"patch"``
    (``[C, height, width]``, the dataset's pixels as stored, i.e. normalised)``}``."""
    store = open_run(run)
    protos = read_prototypes(store)
    if not 0 <= int(prototype) < protos.n_prototypes:
        raise IndexError(f"prototype: expected an id in [0, {protos.n_prototypes}), got {prototype}")
    indices, _ = store.probe()
    return exemplar_patches_at(protos.exemplars, indices, dataset.images, store.grid, int(prototype), context)


def image_size(run) -> int | None:
    """The side length the run's images had (None: the dataset's default). Known from the targets
    (they store the training images' size); otherwise the one whose grid at the run's layer, in
    the run's architecture (rebuilt from the manifest, weights not needed), is the run's grid."""
    store = open_run(run)
    if (store.path / "targets.json").exists():
        hw = (store.read_json("targets") or {}).get("image_hw")
        if isinstance(hw, list) and len(hw) == 2:
            return int(hw[0])
    spec, grid = store.manifest["model"].get("build"), store.grid
    info = DATASET_INFO.get(store.manifest["dataset"].get("name"))
    if not isinstance(spec, dict) or grid is None or info is None:
        return None
    at_default = _grid_at(spec, store.manifest["model"]["layer"], info.size)
    if at_default is None or tuple(at_default) == tuple(grid):
        return None
    # The layer's stride is fixed: scale the default size by the ratio of the grids.
    size = round(info.size * grid[0] / at_default[0])
    if _grid_at(spec, store.manifest["model"]["layer"], size) != tuple(grid):
        raise ValueError(f"no image size gives the run's {grid[0]}x{grid[1]} grid at its layer; pass dataset=")
    return size


def _grid_at(spec: dict, layer: str, size: int) -> tuple[int, int] | None:
    model, _ = rebuild_model(spec)
    shape = layer_output_shape(model, layer, torch.zeros(1, int(spec.get("in_channels", 1)), size, size))
    return (shape[-2], shape[-1]) if len(shape) == 4 else None
