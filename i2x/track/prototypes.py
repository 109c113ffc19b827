"""Stage 2 of I2X: visual prototypes from the final model's target layer.

Every spatial position of the target layer's output ``A [N, C, h, w]`` over the probe set is one
``C``-vector. They are reduced by PCA and clustered by k-means; each cluster centre is a
*prototype*, and every position gets its nearest one (the assignment map ``a [N, h, w]``, fixed
for all checkpoints). Choices the paper leaves open, all keyword options of ``fit_prototypes``:

- PCA to ``pca_dim`` (64) dimensions from the exact covariance of *all* positions (accumulated in
  float64, ``torch.linalg.eigh``); each component's sign is fixed so that its entry of largest
  magnitude is positive, which makes the basis, and therefore the centroids, reproducible.
- k-means with ``n_prototypes`` (32) clusters on a seeded uniform subsample of at most
  ``max_fit_positions`` (200,000) positions; greedy k-means++ initialisation (each new centre is
  the best of ``2 + int(ln K)`` candidates drawn proportionally to the squared distance, the rule
  scikit-learn uses), then Lloyd iterations, best of ``n_init`` (3) runs by inertia.
- Lloyd stops after ``max_iter`` (100) iterations, when no label changes, or when the summed
  squared centroid shift falls to ``tol`` (1e-4) times the mean per-dimension variance of the
  fitted vectors (scikit-learn's convention for ``tol``).
- An empty cluster is re-seeded with the position farthest from its centroid (distinct positions
  for several empty clusters, farthest first, ties to the lower index).
- ``n_exemplars`` (8) exemplars per prototype: the positions assigned to it with the smallest
  distance (ties to the lower position index).

Memory: the features are streamed twice (``feature_batches`` is called twice) and never held
whole; what is kept is the ``[P, d]`` float32 projection of all ``P = N h w`` positions (490k x 64
is 125 MB), the ``[C, C]`` float64 covariance and the ``[N, h, w]`` results. Distances are never
materialised as a ``[P, K]`` matrix: every assignment runs in the blocked kernel
``i2x.ops.prototype_assign``.

Computation runs on the device of the first feature batch; the ``Prototypes`` it returns hold CPU
tensors. On CUDA, ``index_add_`` (the centroid update) is not bitwise deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from i2x import ops
from i2x._internal.checks import check_int, check_number, describe
from i2x._internal.memory import check_memory_budget
from i2x._internal.modules import (
    eval_mode,
    find_last_spatial_layer,
    resolve_layer,
    run_device,
)
from i2x._internal.profiling import profiled
from i2x._internal.progress import bar as _bar
from i2x._internal.tensors import as_grid
from i2x.explain.batching import forward_batch_size
from i2x.store import RunStoreError
from i2x.track.streamed import StreamedImages, batches_at, iter_batches

#: k-means is fitted on at most this many grid positions (a seeded sample of them).
MAX_FIT_POSITIONS = 200_000

__all__ = ["MAX_FIT_POSITIONS", "Prototypes", "layer_features", "fit_prototypes", "discover_prototypes",
           "read_assignment", "read_prototypes", "write_prototypes", "layer_features_of", "capture_layer_output"]

# Rows are converted to float64 in chunks of at most this many elements (32 MiB), so no float64
# copy of a whole feature batch (256 x 2048 x 7 x 7 would be 205 MB) is ever made.
_CHUNK_ELEMENTS = 1 << 22

# Rows per block of the k-means centroid sums (summed in float32 within a block, float64 across).
_SUM_BLOCK_ROWS = 8192

# The tensors of Prototypes.to_tensors(): name -> number of dimensions.
_TENSOR_DIMS = {
    "mean": 1,
    "components": 2,
    "explained_variance_ratio": 1,
    "centroids": 2,
    "assignment": 3,
    "distances": 3,
    "exemplars": 3,
    "exemplar_distances": 2,
    "inertia": 0,
}


# ----------------------------------------------------------------------------------------------
# The result


@dataclass(repr=False, eq=False)
class Prototypes:
    """Prototypes of a probe set (all tensors on the CPU).

    Attributes:
        mean: ``[C]`` float32, mean feature over all positions (PCA centring).
        components: ``[C, d]`` float32, the top ``d`` principal directions as columns.
        explained_variance_ratio: ``[d]`` float64, each component's share of the total variance.
        centroids: ``[K, d]`` float32, the prototypes in the projected space.
        assignment: ``[N, h, w]`` int64, nearest prototype of every position.
        distances: ``[N, h, w]`` float32, squared distance to that prototype (projected space).
        exemplars: ``[K, E, 3]`` int64 rows ``(sample, row, col)`` of the positions closest to each
            prototype among those assigned to it, nearest first; ``-1`` rows pad a prototype with
            fewer than ``E`` positions.
        exemplar_distances: ``[K, E]`` float32, their squared distances (``inf`` where padded).
        inertia: k-means objective (sum of squared distances) on the fitted positions, i.e. the
            subsample when one was drawn (as scikit-learn's ``inertia_``); the total over all
            positions is ``distances.sum()``.
        options: the keyword options of ``fit_prototypes`` that produced it (JSON-safe).
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance_ratio: torch.Tensor
    centroids: torch.Tensor
    assignment: torch.Tensor
    distances: torch.Tensor
    exemplars: torch.Tensor
    exemplar_distances: torch.Tensor
    inertia: float
    options: dict = field(default_factory=dict)

    @property
    def n_prototypes(self) -> int:
        """K."""
        return int(self.centroids.shape[0])

    @property
    def pca_dim(self) -> int:
        """d, the projected dimension actually used (``pca_dim`` clipped to C)."""
        return int(self.components.shape[1])

    def counts(self) -> torch.Tensor:
        """``[K]`` int64: how many positions are assigned to each prototype."""
        return torch.bincount(self.assignment.reshape(-1), minlength=self.n_prototypes)

    def assign(self, features: torch.Tensor, return_distances: bool = False):
        """Nearest prototype of every position of new features.

        Args:
            features: ``[B, C, h, w]`` raw layer output (projected here with ``mean`` and
                ``components``), on any device.
            return_distances: also return the squared distances ``[B, h, w]``.

        Returns:
            ``[B, h, w]`` int64 on the features' device (and the distances).
        """
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"Prototypes.assign: features must be a torch.Tensor, got {type(features).__name__}")
        channels = int(self.mean.shape[0])
        if features.dim() != 4 or features.shape[1] != channels:
            raise ValueError(
                f"Prototypes.assign: features must be [B, {channels}, h, w] (the channels the prototypes were "
                f"fitted on), got shape {tuple(features.shape)}"
            )
        device = features.device
        return ops.prototype_assign(
            features,
            self.centroids.to(device),
            self.mean.to(device),
            self.components.to(device),
            return_distances=return_distances,
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Contiguous CPU tensors for ``safetensors.torch.save_file`` (``inertia`` as a 0-d
        float64 tensor); ``options`` are left to the caller (JSON)."""
        tensors = {name: getattr(self, name) for name in _TENSOR_DIMS if name != "inertia"}
        tensors["inertia"] = torch.tensor(self.inertia, dtype=torch.float64)
        return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], options: dict | None = None) -> Prototypes:
        """Rebuild from ``to_tensors()``'s dict (e.g. after ``safetensors.torch.load_file``)."""
        if not isinstance(tensors, dict):
            raise TypeError(f"Prototypes.from_tensors: tensors must be a dict of tensors, got {type(tensors).__name__}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"Prototypes.from_tensors: options must be a dict or None, got {type(options).__name__}")
        missing = [name for name in _TENSOR_DIMS if name not in tensors]
        if missing:
            raise ValueError(f"Prototypes.from_tensors: tensors lacks {missing}; it holds {sorted(tensors)}")
        for name, dims in _TENSOR_DIMS.items():
            t = tensors[name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Prototypes.from_tensors: tensors[{name!r}] must be a tensor, got {type(t).__name__}")
            if t.dim() != dims:
                raise ValueError(
                    f"Prototypes.from_tensors: tensors[{name!r}] must have {dims} dimension(s), "
                    f"got shape {tuple(t.shape)}"
                )
        for name in ("assignment", "exemplars"):
            if tensors[name].dtype != torch.int64:
                raise TypeError(f"Prototypes.from_tensors: tensors[{name!r}] must be int64, got {tensors[name].dtype}")
        _check_consistent_shapes(tensors)
        fields = {name: tensors[name].to("cpu").contiguous() for name in _TENSOR_DIMS if name != "inertia"}
        return cls(**fields, inertia=float(tensors["inertia"]), options=dict(options or {}))

    def __repr__(self) -> str:
        n, h, w = self.assignment.shape
        return (
            f"Prototypes(K={self.n_prototypes}, d={self.pca_dim}, C={int(self.mean.shape[0])}, "
            f"positions={n}x{h}x{w}, inertia={self.inertia:.6g})"
        )


def _check_consistent_shapes(t: dict[str, torch.Tensor]) -> None:
    c, d = t["components"].shape
    k = t["centroids"].shape[0]
    expected = {
        "mean": (c,),
        "explained_variance_ratio": (d,),
        "centroids": (k, d),
        "distances": tuple(t["assignment"].shape),
        "exemplars": (k, t["exemplars"].shape[1], 3),
        "exemplar_distances": (k, t["exemplars"].shape[1]),
    }
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape:
            raise ValueError(
                f"Prototypes.from_tensors: tensors[{name!r}] has shape {tuple(t[name].shape)}, expected {shape} "
                f"(from components [C={c}, d={d}], centroids [K={k}, d] and assignment {tuple(t['assignment'].shape)})"
            )


# ----------------------------------------------------------------------------------------------
# Layer features


def layer_features(
    model: nn.Module,
    layer,
    images,
    batch_size: int | None = None,
    device=None,
    reshape: Callable | None = None,
    memory_budget: float | None = None,
) -> Iterator[torch.Tensor]:
    """The target layer's output for the probe images, batch by batch.

    Args:
        model: any ``nn.Module`` (DataParallel / DDP-wrapped too). It runs in eval mode under
            ``torch.no_grad()``; every submodule's training flag is put back after each batch,
            and the forward hook is removed after each batch, even when the forward raises.
        layer: a submodule or its dotted name (``"layer4"``), or None for the last layer with a
            4-D output larger than 1 x 1 (as ``Explainer``).
        images: ``[N, ...]`` tensor, or a dataset (``len`` + indexing) whose items are image
            tensors or tuples starting with one (``(image, label)``).
        batch_size: images per forward; None: as many as ``memory_budget`` MiB hold (default 256
            MiB; at most 256 images, docs/memory.md).
        device: where the forward runs; None: the device of the model's first parameter (CPU
            for a model without any).
        reshape: callable turning the layer's output into ``[B, C, h, w]`` (``i2x.vit_reshape``).

    Yields:
        ``[B, C, h, w]`` detached feature batches on ``device``, in image order. Arguments are
        checked at the call; the forwards run as the iterator is consumed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size")
    check_memory_budget(memory_budget)
    if reshape is not None and not callable(reshape):
        raise TypeError(f"reshape must be callable or None, got {type(reshape).__name__}")
    source = _ImageSource(images)
    resolved = None if layer is None else resolve_layer(model, layer)
    target = run_device(model, device)
    if batch_size is None:
        batch_size = forward_batch_size(model, source.first(), memory_budget, in_flight=source.in_flight,
                                        device=target) if len(source) else 1
    return _layer_feature_batches(model, resolved, source, batch_size, target, reshape)


def _layer_feature_batches(model, resolved, source, batch_size, device, reshape) -> Iterator[torch.Tensor]:
    for x in source.batches(batch_size):
        x = x.to(device)
        if resolved is None:
            with eval_mode(model):
                resolved = resolve_layer(model, find_last_spatial_layer(model, x))
        yield capture_layer_output(model, resolved, x, reshape)


def capture_layer_output(model: nn.Module, resolved: tuple[str, nn.Module], x: torch.Tensor, reshape) -> torch.Tensor:
    """One no-grad eval forward of ``x``; the layer's output as ``[B, C, h, w]``."""
    name, module = resolved
    recorded: list[torch.Tensor] = []

    def hook(mod, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"layer {name!r} returns {type(output).__name__}, not a tensor; "
                             "pick a layer whose output is one")
        # A copy: an in-place op after the layer (ReLU(inplace=True)) would overwrite the output.
        recorded.append(output.detach().clone())

    handle = module.register_forward_hook(hook)
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        handle.remove()
    if len(recorded) != 1:
        what = "did not run" if not recorded else f"ran {len(recorded)} times"
        raise ValueError(f"layer {name!r} {what} during one forward; pick a layer that runs once per forward")
    return as_grid(recorded[0], name, reshape)


class _ImageSource:
    """Batches of a ``[N, ...]`` tensor, a streamed probe, a torch Dataset or a sequence of images."""

    def __init__(self, images):
        if isinstance(images, torch.Tensor):
            if images.dim() < 1:
                raise ValueError("images must be a [N, ...] tensor or a dataset, got a 0-d tensor")
        elif not (hasattr(images, "__getitem__") and hasattr(images, "__len__")):
            raise TypeError("images must be a [N, ...] tensor or a dataset (len + indexing), "
                            f"got {type(images).__name__}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    @property
    def in_flight(self) -> int:
        """Input batches a DataLoader holds besides the one in use (two per worker)."""
        return 2 * self.images.num_workers if isinstance(self.images, StreamedImages) else 0

    def first(self) -> torch.Tensor:
        """The first image ``[C, H, W]`` (sizes the default batch)."""
        item = self.images[0]
        if isinstance(item, (tuple, list)) and item:
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise TypeError("images[0] must be an image tensor (or a tuple starting with one), "
                            f"got {type(item).__name__}")
        return item

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The images in order, ``batch_size`` at a time. A streamed probe or a torch Dataset is
        read through one DataLoader per pass (workers stay up for the whole pass)."""
        if isinstance(self.images, (torch.Tensor, StreamedImages)):
            yield from (x for _, x in iter_batches(self.images, batch_size))
        elif isinstance(self.images, torch.utils.data.Dataset):
            yield from (x for _, x in batches_at(self.images, torch.arange(len(self)), batch_size))
        else:
            for start in range(0, len(self), batch_size):
                yield self._stacked(start, min(start + batch_size, len(self)))

    def _stacked(self, start: int, stop: int) -> torch.Tensor:
        """Items ``start:stop`` of an in-memory sequence of images, stacked."""
        items: list[torch.Tensor] = []
        for i in range(start, stop):
            item = self.images[i]
            if isinstance(item, (tuple, list)) and item:
                item = item[0]
            if not isinstance(item, torch.Tensor):
                raise TypeError(f"images[{i}] must be an image tensor (or a tuple starting with one), "
                                f"got {type(item).__name__}")
            if items and item.shape != items[0].shape:
                raise ValueError(f"images[{i}] has shape {tuple(item.shape)}, images[{start}] {tuple(items[0].shape)}; "
                                 "images of one batch must share a shape")
            items.append(item)
        return torch.stack(items)


# ----------------------------------------------------------------------------------------------
# Fitting


def fit_prototypes(
    feature_batches: Callable[[], Iterable[torch.Tensor]],
    n_prototypes: int = 32,
    pca_dim: int = 64,
    seed: int = 0,
    max_fit_positions: int = MAX_FIT_POSITIONS,
    n_init: int = 3,
    max_iter: int = 100,
    tol: float = 1e-4,
    n_exemplars: int = 8,
    progress: bool = False,
) -> Prototypes:
    """PCA + k-means prototypes of streamed layer features.

    Args:
        feature_batches: zero-argument callable returning a *fresh* iterable of ``[B, C, h, w]``
            float tensors (the same features in the same order each time); it is called twice:
            once for the mean and covariance, once for the projection.
        n_prototypes: K, the number of k-means clusters.
        pca_dim: d, PCA dimensions kept (clipped to C).
        seed: seeds the subsample and the k-means++ draws (a ``torch.Generator``).
        max_fit_positions: k-means is fitted on a uniform subsample of at most this many positions
            (all positions are assigned afterwards).
        n_init: k-means runs from different k-means++ starts; the lowest inertia wins.
        max_iter: Lloyd iterations per run at most.
        tol: stop when the summed squared centroid shift is at most ``tol`` x the mean
            per-dimension variance of the fitted vectors.
        n_exemplars: E, exemplar positions kept per prototype (0 for none).
        progress: show tqdm progress bars (not recorded in ``options``).

    Returns:
        ``Prototypes`` (CPU tensors), ``options`` holding every option above but ``progress``.
    """
    options: dict[str, Any] = {
        "n_prototypes": check_int(n_prototypes, "n_prototypes"),
        "pca_dim": check_int(pca_dim, "pca_dim"),
        "seed": check_int(seed, "seed", None),
        "max_fit_positions": check_int(max_fit_positions, "max_fit_positions"),
        "n_init": check_int(n_init, "n_init"),
        "max_iter": check_int(max_iter, "max_iter"),
        "tol": check_number(tol, "tol", 0),
        "n_exemplars": check_int(n_exemplars, "n_exemplars", 0),
    }
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if not callable(feature_batches):
        raise TypeError(
            "feature_batches must be a zero-argument callable returning a fresh iterable of [B, C, h, w] tensors "
            f"(it is iterated twice), got {type(feature_batches).__name__}"
        )
    k = options["n_prototypes"]

    moments = _accumulate_moments(feature_batches, progress)
    n_fit = min(moments.count, options["max_fit_positions"])
    if k > n_fit:
        raise ValueError(
            f"n_prototypes={k} is more than the {n_fit} positions k-means would be fitted on "
            f"({moments.count} positions in all, max_fit_positions={options['max_fit_positions']})"
        )
    mean, components, variance_ratio = _pca(moments, options["pca_dim"])
    projected = _project_all(feature_batches, moments, mean, components, progress)

    generator = torch.Generator().manual_seed(options["seed"])
    fit_rows = _subsample(projected, n_fit, generator)
    centroids, inertia = _kmeans(
        fit_rows, k, generator, options["n_init"], options["max_iter"], options["tol"], progress
    )
    del fit_rows
    index, distance = ops.prototype_assign(projected, centroids, return_distances=True)
    del projected
    exemplars, exemplar_distances = _exemplars(index, distance, k, options["n_exemplars"], moments.grid)
    n, (h, w) = moments.n_samples, moments.grid
    cpu = torch.device("cpu")
    return Prototypes(
        mean=mean.to(cpu),
        components=components.to(cpu),
        explained_variance_ratio=variance_ratio.to(cpu),
        centroids=centroids.to(cpu),
        assignment=index.reshape(n, h, w).to(cpu),
        distances=distance.reshape(n, h, w).to(cpu),
        exemplars=exemplars.to(cpu),
        exemplar_distances=exemplar_distances.to(cpu),
        inertia=inertia,
        options=options,
    )


@profiled("i2x::discover_prototypes")
def discover_prototypes(
    model: nn.Module,
    layer,
    images,
    batch_size: int | None = None,
    device=None,
    reshape: Callable | None = None,
    memory_budget: float | None = None,
    **fit_options,
) -> Prototypes:
    """Prototypes of ``model`` at ``layer`` over the probe ``images``: ``layer_features`` (see
    there for the arguments) streamed into ``fit_prototypes`` (``fit_options``). The model runs
    twice over the images, so no more than one batch of raw features is ever held."""
    if batch_size is None and len(images):  # sized once: both passes batch alike
        target = run_device(model, device)
        source = _ImageSource(images)
        batch_size = forward_batch_size(model, source.first(), memory_budget, in_flight=source.in_flight,
                                        device=target)
    layer_features(model, layer, images, batch_size, device, reshape, memory_budget)  # checks the arguments now
    return fit_prototypes(lambda: layer_features(model, layer, images, batch_size, device, reshape), **fit_options)


# ----------------------------------------------------------------------------------------------
# Streaming passes


@dataclass
class _Moments:
    """Pass 1: shifted sums of all positions, in float64. ``shift`` (the first batch's mean)
    keeps the covariance ``(gram - n m m^T)`` free of cancellation when the mean is large."""

    count: int
    n_samples: int
    channels: int
    grid: tuple[int, int]
    device: torch.device
    shift: torch.Tensor  # [C]
    total: torch.Tensor  # [C] sum of (x - shift)
    gram: torch.Tensor  # [C, C] sum of (x - shift)(x - shift)^T


def _checked_batches(feature_batches, pass_name: str, progress: bool, expect: _Moments | None = None):
    """The batches of one pass, checked: 4-D float tensors, finite, one C and one h x w, moved to
    the first batch's device (``expect``'s on the second pass). Yields ``(batch, device)``."""
    iterable = feature_batches()
    try:
        iterator = iter(iterable)
    except TypeError:
        raise TypeError(
            f"feature_batches() must return an iterable of [B, C, h, w] tensors, got {type(iterable).__name__}"
        ) from None
    geometry = None if expect is None else (expect.channels, *expect.grid)
    device = None if expect is None else expect.device
    for i, batch in enumerate(_bar(iterator, desc=f"prototypes: {pass_name}", unit="batch", enabled=progress)):
        where = f"feature batch {i} ({pass_name})"
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"{where} must be a torch.Tensor [B, C, h, w], got {type(batch).__name__}")
        if batch.dim() != 4:
            raise ValueError(f"{where} must be 4-D [B, C, h, w], got shape {tuple(batch.shape)}")
        if not batch.is_floating_point():
            raise TypeError(f"{where} must be a floating-point tensor, got {batch.dtype}")
        shape = (int(batch.shape[1]), int(batch.shape[2]), int(batch.shape[3]))
        if geometry is None:
            geometry = shape
        elif shape != geometry:
            raise ValueError(
                f"{where} has C, h, w = {shape}, earlier batches {geometry}; every batch must share channels and grid"
            )
        if batch.numel() == 0:
            continue
        finite = torch.isfinite(batch)
        if not bool(finite.all()):
            raise ValueError(f"{where} contains {int((~finite).sum())} NaN/inf value(s); the features must be finite")
        if device is None:
            device = batch.device
        yield batch.to(device), device


def _position_rows(batch: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B h w, C]``, rows in (sample, row, col) order."""
    return batch.permute(0, 2, 3, 1).reshape(-1, batch.shape[1])


def _accumulate_moments(feature_batches, progress: bool) -> _Moments:
    m = None
    for batch, device in _checked_batches(feature_batches, "covariance", progress):
        rows = _position_rows(batch)
        if m is None:
            c = rows.shape[1]
            m = _Moments(
                count=0, n_samples=0, channels=c, grid=(int(batch.shape[2]), int(batch.shape[3])), device=device,
                shift=rows.mean(dim=0, dtype=torch.float64),
                total=torch.zeros(c, dtype=torch.float64, device=device),
                gram=torch.zeros(c, c, dtype=torch.float64, device=device),
            )
        for chunk in rows.split(max(1, _CHUNK_ELEMENTS // m.channels)):
            x = chunk.to(torch.float64) - m.shift
            m.total += x.sum(dim=0)
            m.gram.addmm_(x.t(), x)
        m.count += rows.shape[0]
        m.n_samples += int(batch.shape[0])
    if m is None:
        raise ValueError("feature_batches() yielded no feature positions (no batches, or only empty ones)")
    return m


def _pca(m: _Moments, pca_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean [C] float32, components [C, d] float32, explained_variance_ratio [d] float64)``."""
    centred_mean = m.total / m.count
    cov = (m.gram - m.count * torch.outer(centred_mean, centred_mean)) / max(m.count - 1, 1)
    cov = 0.5 * (cov + cov.t())  # exactly symmetric for eigh
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    eigenvalues = eigenvalues.flip(0).clamp(min=0)
    d = min(pca_dim, m.channels)
    components = eigenvectors.flip(1)[:, :d]
    # An eigenvector's sign is arbitrary; fixing it makes the projection reproducible.
    pivot = components.abs().argmax(dim=0)
    signs = torch.sign(components[pivot, torch.arange(d, device=components.device)])
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    total_variance = eigenvalues.sum()
    ratio = eigenvalues[:d] / total_variance if total_variance > 0 else torch.zeros_like(eigenvalues[:d])
    mean = m.shift + centred_mean
    return mean.to(torch.float32), components.to(torch.float32), ratio


def _project_all(feature_batches, m: _Moments, mean, components, progress: bool) -> torch.Tensor:
    """Pass 2: ``(f - mean) @ components`` of every position, ``[P, d]`` float32."""
    projected = torch.empty(m.count, components.shape[1], dtype=torch.float32, device=m.device)
    offset = 0
    samples = 0
    for batch, _ in _checked_batches(feature_batches, "projection", progress, expect=m):
        rows = _position_rows(batch)
        if offset + rows.shape[0] > m.count:
            break
        for chunk in rows.split(max(1, _CHUNK_ELEMENTS // m.channels)):
            # Centred before the product: f @ W - mean @ W would lose digits when |mean| >> spread.
            torch.mm(chunk.to(torch.float32) - mean, components, out=projected[offset : offset + chunk.shape[0]])
            offset += chunk.shape[0]
        samples += int(batch.shape[0])
    else:
        if offset == m.count and samples == m.n_samples:
            return projected
    raise ValueError(
        f"feature_batches() gave {m.count} positions ({m.n_samples} samples) on the first pass and "
        f"{'more' if offset >= m.count else offset} on the second; it must return a fresh iterable of the same "
        "features each time it is called"
    )


# ----------------------------------------------------------------------------------------------
# k-means


def _subsample(x: torch.Tensor, n_fit: int, generator: torch.Generator) -> torch.Tensor:
    """``n_fit`` rows of ``x`` drawn uniformly without replacement (kept in row order), or ``x``."""
    if n_fit >= x.shape[0]:
        return x
    rows = torch.randperm(x.shape[0], generator=generator)[:n_fit].sort().values
    return x[rows.to(x.device)]


def _squared_distances(x: torch.Tensor, x_norms: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` squared distances to a few centres (m is the number of k-means++ candidates)."""
    d = torch.addmm(x_norms[:, None], x, centres.t(), alpha=-2.0)
    return d.add_(centres.pow(2).sum(dim=1)).clamp_(min=0)


def _kmeans_plus_plus(x: torch.Tensor, x_norms: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii; the greedy variant of scikit-learn): each new
    centre is the candidate, among ``2 + int(ln k)`` drawn proportionally to the squared distance
    to the nearest centre so far, that lowers the total squared distance most. ``[k, d]``."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centres = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    centres[0] = x[first]
    closest = _squared_distances(x, x_norms, x[first : first + 1])[:, 0]
    potential = closest.sum(dtype=torch.float64)
    for c in range(1, k):
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * potential
        cumulative = torch.cumsum(closest, dim=0, dtype=torch.float64)
        candidates = torch.searchsorted(cumulative, draws).clamp_(max=n - 1)
        with_candidate = torch.minimum(closest[:, None], _squared_distances(x, x_norms, x[candidates]))
        potentials = with_candidate.sum(dim=0, dtype=torch.float64)
        best = int(potentials.argmin())
        closest = with_candidate[:, best].contiguous()
        potential = potentials[best]
        centres[c] = x[candidates[best]]
    return centres


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums [k, d] float64, counts [k] int64)``: float32 ``index_add_`` over blocks of rows,
    the blocks' sums added in float64 (as accurate as a float64 sum of blocks, at float32 speed:
    converting every row to float64 would cost 3x the time)."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    block = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    for rows, lab in zip(x.split(_SUM_BLOCK_ROWS), labels.split(_SUM_BLOCK_ROWS), strict=True):
        sums += block.zero_().index_add_(0, lab, rows)
    return sums, torch.bincount(labels, minlength=k)


def _update_centroids(x, labels, distance, centroids) -> torch.Tensor:
    """Lloyd's mean step; each empty cluster takes one of the positions farthest from their
    centroids (removed from the cluster it leaves). ``[k, d]`` float64."""
    k = centroids.shape[0]
    sums, counts = _cluster_sums(x, labels, k)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        far = torch.argsort(distance, descending=True, stable=True)[: empty.numel()]
        donors = labels[far]
        sums.index_add_(0, donors, -x[far].to(torch.float64))
        counts.index_add_(0, donors, -torch.ones_like(donors))
        sums[empty] = x[far].to(torch.float64)
        counts[empty] = 1
    means = sums / counts.clamp(min=1)[:, None].to(torch.float64)
    # A donor left without positions keeps its previous centroid rather than jumping to 0.
    return torch.where((counts == 0)[:, None], centroids.to(torch.float64), means)


def _lloyd(x, centroids, max_iter: int, shift_tol: float) -> tuple[torch.Tensor, float]:
    """Lloyd iterations from ``centroids``: ``(centroids, inertia)``, the inertia (and the
    assignment it comes from) belonging to the centroids returned."""
    labels, distance = ops.prototype_assign(x, centroids, return_distances=True)
    for _ in range(max_iter):
        updated = _update_centroids(x, labels, distance, centroids)
        shift = float((updated - centroids.to(torch.float64)).pow(2).sum())
        centroids = updated.to(x.dtype)
        new_labels, distance = ops.prototype_assign(x, centroids, return_distances=True)
        # No label changed: the centroids are already the means of their clusters.
        if shift <= shift_tol or torch.equal(new_labels, labels):
            break
        labels = new_labels
    return centroids, float(distance.sum(dtype=torch.float64))


def _kmeans(x, k: int, generator, n_init: int, max_iter: int, tol: float, progress: bool) -> tuple[torch.Tensor, float]:
    """Best of ``n_init`` k-means++ + Lloyd runs by inertia: ``(centroids [k, d], inertia)``."""
    x_norms = x.pow(2).sum(dim=1)
    shift_tol = tol * float(x.var(dim=0, correction=0).mean())
    best, best_inertia = None, math.inf
    for _ in _bar(range(n_init), desc="prototypes: k-means", unit="init", enabled=progress):
        centroids, inertia = _lloyd(x, _kmeans_plus_plus(x, x_norms, k, generator), max_iter, shift_tol)
        if inertia < best_inertia or best is None:
            best, best_inertia = centroids, inertia
    assert best is not None  # n_init >= 1 runs
    return best, best_inertia


def _exemplars(index, distance, k: int, n_exemplars: int, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prototype the ``n_exemplars`` nearest of its positions: ``([k, E, 3] (sample, row, col)
    int64, -1 padded; [k, E] distances, inf padded)``."""
    h, w = grid
    # Sorted by prototype, then distance, then position (both sorts stable).
    order = torch.argsort(distance, stable=True)
    order = order[torch.argsort(index[order], stable=True)]
    counts = torch.bincount(index, minlength=k)
    starts = torch.cumsum(counts, dim=0) - counts
    ranks = torch.arange(n_exemplars, device=index.device)
    valid = ranks[None, :] < counts[:, None]
    slots = (starts[:, None] + ranks[None, :]).clamp(max=order.numel() - 1)  # padded slots: any valid index
    flat = order[slots]
    rows = torch.stack([flat // (h * w), (flat % (h * w)) // w, flat % w], dim=-1)
    exemplars = torch.where(valid[..., None], rows, torch.full_like(rows, -1))
    exemplar_distances = torch.where(valid, distance[flat], torch.full_like(distance[flat], math.inf))
    return exemplars, exemplar_distances.to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Reading them back from a run


def _checked_against_run(store, assignment: torch.Tensor, centroids: torch.Tensor) -> None:
    path = store.path / "prototypes.safetensors"
    if centroids.dim() != 2 or centroids.shape[0] < 1:
        raise RunStoreError(f"{path}: centroids must be [K, d] with K >= 1, got {list(centroids.shape)}")
    expected = [store.probe_size, *(store.grid or ())]
    if list(assignment.shape) != expected:
        raise RunStoreError(
            f"{path}: assignment has shape {list(assignment.shape)}, but the run's probe and grid give {expected}; "
            "re-run the prototypes on this run (i2x track, or Tracker.fit_prototypes)"
        )
    if assignment.is_floating_point() or assignment.dtype == torch.bool:
        raise RunStoreError(f"{path}: assignment must be an integer tensor, got {describe(assignment)}")


def _require_file(store) -> None:
    path = store.path / "prototypes.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"run {store.path} has no prototypes (no {path.name}): finish the tracker "
                                "(Tracker.finish) or run `i2x track` without --no-prototypes")


def read_assignment(store) -> tuple[torch.Tensor, int]:
    """``(assignment [N, h, w] int64, K)`` of the run's prototypes, checked against its probe and
    grid: all the analysis needs (a file holding only ``assignment`` and ``centroids`` will do)."""
    _require_file(store)
    tensors = store.read_tensors("prototypes", required=("assignment", "centroids"))
    _checked_against_run(store, tensors["assignment"], tensors["centroids"])
    return tensors["assignment"].long(), int(tensors["centroids"].shape[0])


def read_prototypes(store) -> Prototypes:
    """The run's whole :class:`Prototypes` (with the options they were fitted with), checked
    against its probe and grid."""
    _require_file(store)
    path = store.path / "prototypes.safetensors"
    try:
        tensors = store.read_tensors("prototypes")
        protos = Prototypes.from_tensors(tensors, (store.stage("prototypes") or {}).get("options"))
    except (KeyError, TypeError, ValueError) as e:
        raise RunStoreError(f"{path} is corrupt ({e}); re-run the prototypes") from None
    _checked_against_run(store, protos.assignment, protos.centroids)
    return protos


def write_prototypes(store, protos: Prototypes) -> None:
    """Store prototypes in the run, checking they cover its probe set and grid."""
    expected = [store.probe_size, *(store.grid or protos.assignment.shape[1:])]
    if list(protos.assignment.shape) != list(expected):
        raise ValueError(f"prototypes: assignment has shape {list(protos.assignment.shape)}, "
                         f"the run expects {expected}")
    store.write_tensors("prototypes", protos.to_tensors(), record={"options": protos.options,
                                                                    "n_prototypes": protos.n_prototypes})


def layer_features_of(model: nn.Module, layer: str, x: torch.Tensor, reshape=None) -> torch.Tensor:
    """``layer``'s output for the images ``x`` as ``[B, C, h, w]``: one no-grad eval forward (the
    features prototypes are assigned from)."""
    return capture_layer_output(model, resolve_layer(model, layer), x, reshape)
