"""Checkpoint tracking: stage 1 of I2X, online inside a training loop or post hoc over saved weights.

At every scheduled checkpoint the probe set is explained in eval mode: the raw GradCAM grid of the
true class (``[N, h, w]``, stored float16) and the softmax (``[N, M]``). Nothing else is kept: no
model copies, no activations. Records go to a :class:`~i2x.store.RunStore`, one atomic file per
checkpoint, so a killed run resumes by redoing only the checkpoint it was writing.

Online::

    tracker = i2x.Tracker(model, "layer3", probe, "runs/fmnist", planned_steps=len(loader) * epochs)
    for step, (x, y) in enumerate(batches, start=1):
        ...train step...
        tracker.step(step)                  # records only at scheduled steps
    tracker.finish(step)                    # the final model (+ prototypes, by default)

Post hoc: :func:`track_checkpoints` over a folder of saved weights (safetensors, or torch files
read with ``weights_only=True``).

Under ``torch.distributed`` every rank explains its contiguous shard of the probe set, the shards
are gathered, and rank 0 writes: the run folder is the same as a single process's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from i2x._internal import progress as _progress
from i2x._internal.checks import check_int, describe
from i2x._internal.memory import check_memory_budget
from i2x._internal.modules import eval_mode, run_device, unwrap_model
from i2x._internal.profiling import profiled
from i2x.data import labels_of, stratified_subset
from i2x.explain.batching import explain_batch_size
from i2x.explain.explainer import Explainer
from i2x.store.runstore import RunStore, RunStoreError
from i2x.track.batchnorm import calibration_batch_size, calibration_rows, recalibrated_batchnorm
from i2x.track.prototypes import discover_prototypes, write_prototypes
from i2x.track.streamed import StreamedImages, iter_batches

__all__ = [
    "Probe",
    "Tracker",
    "log_schedule",
    "record_checkpoint",
    "DEFAULT_CHECKPOINTS",
]

DEFAULT_CHECKPOINTS = 12


# ----------------------------------------------------------------------------------------------
# The probe set


@dataclass
class Probe:
    """The samples every checkpoint is explained on.

    Attributes:
        images: ``[N, C, H, W]`` model-ready inputs, or a :class:`i2x.track.StreamedImages`
            view of a dataset (``from_dataset`` on any torch Dataset): read a batch at a time.
        labels: ``[N]`` int64 true classes.
        classes: the ``M`` class names.
        indices: ``[N]`` int64 positions in the source dataset (recorded in the run).
        dataset: JSON description of the source (name, split, ...), recorded in the run.
    """

    images: torch.Tensor | StreamedImages
    labels: torch.Tensor
    classes: list[str]
    indices: torch.Tensor | None = None
    dataset: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.images, (torch.Tensor, StreamedImages)) or self.images.dim() < 2:
            raise ValueError(f"probe images: expected a [N, C, H, W] tensor (or i2x.track.StreamedImages), got "
                             f"{describe(self.images)}")
        if not self.images.is_floating_point():
            raise TypeError(f"probe images: expected a floating-point tensor, got {self.images.dtype}")
        labels = torch.as_tensor(self.labels)
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"probe labels: expected a [N] integer tensor, got {describe(labels)}")
        if labels.numel() != self.images.shape[0]:
            raise ValueError(f"probe: {self.images.shape[0]} images but {labels.numel()} labels")
        if labels.numel() == 0:
            raise ValueError("probe: the probe set is empty")
        self.labels = labels.long()
        self.classes = [str(c) for c in self.classes]
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes):
            raise ValueError(
                f"probe labels: expected values in [0, {len(self.classes) - 1}] for {len(self.classes)} classes, "
                f"got [{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        if self.indices is None:
            self.indices = torch.arange(self.labels.numel())
        self.indices = torch.as_tensor(self.indices).long()
        if self.indices.shape != self.labels.shape:
            raise ValueError(f"probe indices: expected [{self.labels.numel()}], got {list(self.indices.shape)}")

    def __len__(self) -> int:
        return int(self.labels.numel())

    @classmethod
    def from_dataset(cls, dataset, size: int | None = None, seed: int = 0, *, classes: Sequence[str] | None = None,
                     num_workers: int = 0, pin_memory: bool = False) -> Probe:
        """A stratified, seeded subset of ``size`` samples (all when None) of a dataset.

        An ``i2x.data`` dataset (``images``, ``labels``, ``classes`` held as tensors) gives its
        images directly. Any other map-style ``torch.utils.data.Dataset`` of ``(image, label)``
        items (torchvision datasets, ``TensorDataset``, ``ImageFolder``, a ``Subset`` of one, a
        user's own) is streamed: the probe keeps the indices and labels, and every use reads the
        images through a ``DataLoader`` (``num_workers``, ``pin_memory``) a batch at a time, so
        they are never all in memory. Labels come from ``.targets`` / ``.labels`` where the
        dataset has them (read item by item otherwise); class names from ``classes``, the
        dataset's ``.classes``, or ``"0".."M-1"``."""
        if (all(hasattr(dataset, a) for a in ("images", "labels", "classes"))
                and isinstance(dataset.images, torch.Tensor)):
            labels = torch.as_tensor(dataset.labels)
            source, names, name = dataset.images, list(classes or dataset.classes), getattr(dataset, "name", "custom")
        elif hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
            labels = labels_of(dataset)
            if not labels.numel():
                raise ValueError("dataset: it is empty; a probe needs samples")
            names = list(classes) if classes is not None else list(getattr(_root(dataset), "classes", []) or [])
            names = names or [str(c) for c in range(int(labels.max()) + 1)]
            source, name = None, type(_root(dataset)).__name__
        else:
            raise TypeError(f"dataset: expected a map-style torch Dataset of (image, label) items, got "
                            f"{type(dataset).__name__}")
        idx = torch.arange(labels.numel()) if size is None else stratified_subset(labels, size, seed=seed)
        images = (source[idx] if source is not None else
                  StreamedImages(dataset, idx, num_workers=num_workers, pin_memory=pin_memory))
        description = {
            "name": str(name),
            "split": str(getattr(dataset, "split", "")),
            "probe_seed": int(seed),
            "probe_size_requested": None if size is None else int(size),
        }
        if getattr(dataset, "decoy_seed", None) is not None:
            # A decoy dataset's squares depend on their seed: the run reloads them with it.
            description["decoy_seed"] = int(dataset.decoy_seed)
        return cls(images, labels[idx], names, idx, description)

    def shard(self, rank: int, world: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's contiguous share (the first ranks take one more)."""
        n = len(self)
        base, extra = divmod(n, world)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)


def _as_probe(probe, classes) -> Probe:
    if isinstance(probe, Probe):
        return probe
    if isinstance(probe, (tuple, list)) and len(probe) == 2:
        images, labels = probe
        if classes is None:
            classes = [str(c) for c in range(int(torch.as_tensor(labels).max()) + 1)]
        return Probe(images, torch.as_tensor(labels), list(classes))
    if isinstance(probe, torch.utils.data.Dataset) or all(hasattr(probe, a) for a in ("images", "labels", "classes")):
        return Probe.from_dataset(probe, classes=classes)
    raise TypeError(
        "probe: expected an i2x.Probe, a map-style torch Dataset of (image, label) items, or an (images "
        f"[N,C,H,W], labels [N]) pair; got {type(probe).__name__}"
    )


def _root(dataset):
    """The dataset under (nested) ``Subset`` wrappers, for its class names and its name."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


# ----------------------------------------------------------------------------------------------
# Schedules


def log_schedule(
    planned_steps: int, n_checkpoints: int = DEFAULT_CHECKPOINTS, first_step: int | None = None
) -> list[int]:
    """``n_checkpoints`` distinct steps log-spaced (denser early) from ``first_step`` to
    ``planned_steps``, always ending at ``planned_steps``.

    Log spacing follows how fast the model changes: most of what it learns, it learns early.
    ``first_step`` defaults to 1% of the run (at least step 1): a few steps into training the
    model has barely moved, and two checkpoints there would only record noise.
    Where rounding makes early steps collide, the next free steps are taken instead.
    """
    planned_steps = check_int(planned_steps, "planned_steps")
    n_checkpoints = check_int(n_checkpoints, "n_checkpoints")
    first = max(1, planned_steps // 100) if first_step is None else check_int(first_step, "first_step")
    if not 1 <= first <= planned_steps:
        raise ValueError(f"first_step: expected an int in [1, planned_steps={planned_steps}], got {first_step!r}")
    n = min(n_checkpoints, planned_steps - first + 1)
    if n == 1:
        return [planned_steps]
    steps: list[int] = []
    span = math.log(planned_steps / first)
    for i in range(n):
        s = round(first * math.exp(span * i / (n - 1)))
        s = max(s, steps[-1] + 1 if steps else first)
        steps.append(s)
    # Collisions pushed early steps up; pull the tail back so the last one is the planned end.
    steps[-1] = planned_steps
    for i in range(n - 2, -1, -1):
        steps[i] = min(steps[i], steps[i + 1] - 1)
    return steps


def _check_schedule(schedule) -> list[int]:
    try:
        steps = sorted({int(s) for s in schedule})
    except (TypeError, ValueError):
        raise TypeError(f"schedule: expected an iterable of int steps, got {schedule!r}") from None
    if not steps:
        raise ValueError("schedule: expected at least one step, got none")
    if steps[0] < 0:
        raise ValueError(f"schedule: steps must be >= 0, got {steps[0]}")
    return steps


# ----------------------------------------------------------------------------------------------
# Recording one checkpoint


def record_checkpoint(
    explainer: Explainer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    calibration: torch.Tensor | None = None,
    memory_budget: float | None = None,
    calibration_batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw GradCAM grids of the true class and softmax for ``images`` in eval mode.

    ``calibration``: images on which BatchNorm running statistics are recomputed first (see
    :func:`recalibrated_batchnorm`, ``calibration_batch`` images at a time, None: sized from the
    budget); None keeps the model's own. ``batch_size``: images per explain call; None: as many as
    ``memory_budget`` MiB hold (default 256 MiB, docs/memory.md).

    Returns ``(saliency [N, h, w] float32, probs [N, M] float32)`` on the CPU. The model's modes
    (and BatchNorm statistics) are restored afterwards; no parameter's ``.grad`` is touched.
    """
    model = explainer.model
    device = run_device(model, device)
    with recalibrated_batchnorm(model, calibration, device, calibration_batch, memory_budget):
        batch_size = probe_batch_size(explainer, images, batch_size, memory_budget, device)
        return _explain_eval(explainer, images, labels, batch_size, device)


def _explain_eval(explainer, images, labels, batch_size, device):
    saliency, probs = [], []
    with eval_mode(explainer.model):
        for start, x in iter_batches(images, batch_size):
            x = x.to(device, non_blocking=True)
            y = labels[start:start + x.shape[0]].to(device, non_blocking=True)
            grid, logits = explainer.explain(x, targets=y, size=None, normalize=False, return_logits=True)
            saliency.append(grid.float().cpu())
            probs.append(F.softmax(logits.float(), dim=1).cpu())
    if not saliency:
        raise ValueError("record_checkpoint: no images to explain")
    return torch.cat(saliency), torch.cat(probs)


def probe_batch_size(explainer: Explainer, images, batch_size: int | None, memory_budget: float | None,
                     device) -> int:
    """``batch_size`` checked, or (None) the explain batch that fits ``memory_budget``: a streamed
    probe also holds its DataLoader's prefetched batches (two per worker)."""
    if batch_size is not None:
        return check_int(batch_size, "batch_size")
    check_memory_budget(memory_budget)
    if not len(images):
        return 1
    in_flight = 2 * images.num_workers if isinstance(images, StreamedImages) else 0
    return explain_batch_size(explainer, images, memory_budget, in_flight=in_flight, device=device,
                              name="probe images")


# ----------------------------------------------------------------------------------------------
# Distributed helpers


def _dist_context() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_shards(local: torch.Tensor, sizes: list[int], device: torch.device) -> torch.Tensor:
    """Concatenate every rank's ``local`` (first dim ``sizes[r]``) in rank order; all ranks get it.

    Collectives need equal shapes, so shards are padded to the largest one and trimmed after.
    """
    world = len(sizes)
    longest = max(sizes)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).cpu()


@contextlib.contextmanager
def _rank0_buffers(module: nn.Module, device: torch.device):
    """Use rank 0's buffers (BatchNorm running statistics) while recording, then restore.

    DDP syncs buffers only at the start of the next forward, so after a training step every rank
    holds the statistics of its own last batch; recording with them would make each shard of the
    probe set see a different model. The records are rank 0's model, as in a single process.
    """
    saved = []
    for buf in module.buffers():
        if buf.numel() == 0:
            continue
        saved.append((buf, buf.detach().clone()))
        staged = buf.detach().to(device)
        dist.broadcast(staged, src=0)
        with torch.no_grad():
            buf.copy_(staged)
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, original in saved:
                buf.copy_(original)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# The tracker


class Tracker:
    """Records stage 1 of I2X for a probe set at scheduled steps of a training loop.

    Args:
        model: the model being trained (DataParallel/DDP-wrapped is fine: the inner module is
            explained, so no collective of the wrapper runs during recording).
        layer: the target layer (a name or a module), as for :class:`i2x.Explainer`.
        probe: an :class:`i2x.Probe`, an ``i2x.data`` dataset, or ``(images, labels)``.
        run_dir: the run folder (created; reopened to resume when it holds the same run).
        schedule: explicit steps to record. Default: :func:`log_schedule` of ``planned_steps``.
        planned_steps: the loop's total number of steps (needed for the default schedule).
        n_checkpoints: how many log-spaced checkpoints the default schedule has (12).
        first_step: where the default schedule starts (default: 1% of ``planned_steps``).
        method: the CAM method (``gradcam``, as in the paper).
        batch_size: probe images per explain batch while recording (and prototype discovery).
            None (default): as many as ``memory_budget`` holds, at most 256 (docs/memory.md).
        memory_budget: MiB one recording batch may use (activations, gradients, the input batch
            and a loader's prefetched ones). Default 256.
        device: where the probe is explained (default: the model's device).
        model_name: recorded in the run (default: the model's class name).
        classes: class names, when ``probe`` is an ``(images, labels)`` pair.
        reshape: token-to-grid callable for transformer layers.
        recalibrate_bn: recompute BatchNorm running statistics on this many fixed probe images
            (a stratified, seeded subset) before every record, then restore the model's own;
            None or 0 records with the model's running statistics as they are. Default 512.
        progress: print a line per recorded checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        layer,
        probe,
        run_dir: str | Path,
        schedule: Iterable[int] | None = None,
        planned_steps: int | None = None,
        n_checkpoints: int = DEFAULT_CHECKPOINTS,
        first_step: int | None = None,
        method: str = "gradcam",
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        model_name: str | None = None,
        classes: Sequence[str] | None = None,
        reshape=None,
        recalibrate_bn: int | None = 512,
        progress: bool = False,
        memory_budget: float | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if batch_size is not None:
            check_int(batch_size, "batch_size")
        check_memory_budget(memory_budget)
        if schedule is None:
            if planned_steps is None:
                raise ValueError("give planned_steps (the loop's total steps) for the default log-spaced "
                                 "schedule, or an explicit schedule=[steps]")
            steps = log_schedule(planned_steps, n_checkpoints, first_step)
            schedule_info = {"kind": "log", "planned_steps": int(planned_steps), "n_checkpoints": int(n_checkpoints),
                             "first_step": steps[0]}
        else:
            steps = _check_schedule(schedule)
            schedule_info = {"kind": "explicit"}
        schedule_info["steps"] = steps
        self.schedule = steps
        self.probe = _as_probe(probe, classes)
        self.module = unwrap_model(model)
        self.explainer = Explainer(self.module, layer, method=method, reshape=reshape)
        layer_name = self.explainer.layer_names[0] if self.explainer.layer_names else None
        if layer_name is None:
            raise ValueError("layer: the tracker needs the target layer named (a name or a module), not None")
        self.layer = layer_name
        # Sized once, at the first record, not here: a model that cannot take the probe fails there,
        # naming it, after the run folder exists.
        self._batch_size = batch_size
        self._calibration_batch: int | None = None
        self.memory_budget = memory_budget
        self.device = device
        self.progress = progress
        self.rank, self.world = _dist_context()
        self.run_dir = Path(run_dir)
        model_info: dict[str, object] = {"name": model_name or type(self.module).__name__, "layer": layer_name,
                                         "method": method}
        spec = getattr(self.module, "i2x_spec", None)  # set by i2x.build_model: how to rebuild it
        if isinstance(spec, dict):
            model_info["build"] = dict(spec)
        if recalibrate_bn is not None:
            check_int(recalibrate_bn, "recalibrate_bn", 0)
        self.calibration = self._calibration_images(recalibrate_bn or 0)
        options = {"batch_size": batch_size, "memory_budget": memory_budget, "method": method, "world_size": self.world,
                   "recalibrate_bn": int(self.calibration.shape[0]) if self.calibration is not None else 0}
        self.store = self._open_store(model_info, schedule_info, options)
        self.finished = set(self.store.finished_steps()) if self.store is not None else set()
        self.finished = self._agree_on_finished(self.finished)
        self.last_step: int | None = None

    @property
    def batch_size(self) -> int:
        """Probe images per explain batch: the one given, or (sized once, on first use) as many as
        the memory budget holds."""
        if self._batch_size is None:  # memory does not depend on the BatchNorm statistics: no recalibration
            device = run_device(self.module, self.device)
            self._batch_size = probe_batch_size(self.explainer, self.probe.images, None, self.memory_budget, device)
        return self._batch_size

    @property
    def calibration_batch(self) -> int | None:
        """Images per train-mode forward of the BatchNorm recalibration (sized once, from the
        budget: every record and the prototypes then see statistics computed the same way); None
        when the tracker does not recalibrate."""
        if self._calibration_batch is None and self.calibration is not None:
            device = run_device(self.module, self.device)
            self._calibration_batch = calibration_batch_size(self.module, self.calibration, device, self.memory_budget)
        return self._calibration_batch

    def _calibration_images(self, n: int) -> torch.Tensor | None:
        rows = calibration_rows(self.probe.labels, n)
        return None if rows is None else self.probe.images[rows]

    # -- opening the run (rank 0 writes; the others learn what is finished) ---------------------

    def _open_store(self, model_info, schedule_info, options) -> RunStore | None:
        error = None
        store = None
        if self.rank == 0:
            assert self.probe.indices is not None  # Probe.__post_init__ fills it
            try:
                store = RunStore.create(
                    self.run_dir, model=model_info, dataset=dict(self.probe.dataset), classes=self.probe.classes,
                    probe_indices=self.probe.indices, probe_labels=self.probe.labels,
                    schedule=schedule_info, options=options,
                )
                if store.manifest["schedule"] != schedule_info:  # a resumed run with a new schedule
                    store.update_schedule(schedule_info)
            except Exception as e:  # re-raised below on every rank, so no rank waits forever
                error = e
        if self.world > 1:
            flag = [repr(error) if error is not None else None]
            dist.broadcast_object_list(flag, src=0)
            if flag[0] is not None and error is None:
                raise RunStoreError(f"rank 0 could not open the run folder {self.run_dir}: {flag[0]}")
        if error is not None:
            raise error
        return store

    def _agree_on_finished(self, finished: set[int]) -> set[int]:
        if self.world == 1:
            return finished
        box = [sorted(finished)]
        dist.broadcast_object_list(box, src=0)
        return set(box[0])

    # -- the loop's side --------------------------------------------------------------------

    def is_scheduled(self, step: int) -> bool:
        return int(step) in self.schedule

    def step(self, global_step: int) -> bool:
        """Call once per training step; records when ``global_step`` is scheduled and not yet
        finished (a resumed run skips what it already has). Returns whether it recorded."""
        step = int(global_step)
        self.last_step = step
        if step not in self.schedule or step in self.finished:
            return False
        self.record(step)
        return True

    def finish(self, step: int | None = None, prototypes: bool | Mapping = True, save_weights: bool = False):
        """Record the final model at ``step`` (default: the last step seen) and, unless
        ``prototypes=False``, discover the prototypes from it (a dict passes options to
        :func:`i2x.prototypes.fit_prototypes`). ``save_weights``: keep the final weights in the run
        (``weights.safetensors``), for ``i2x curate`` / ``i2x experiment`` later. Returns the
        :class:`RunStore` (None off rank 0)."""
        step = self.last_step if step is None else int(step)
        if step is None:
            raise ValueError("finish: no step seen yet; pass the final step explicitly")
        if step in self.finished:
            # Recorded at this step already (the last scheduled step is usually the last step): the
            # same model, so mark it final instead of explaining the probe again.
            if self.store is not None:
                self.store.mark_final(step)
        else:
            self.record(step, final=True)
        if save_weights and self.rank == 0:
            assert self.store is not None  # rank 0 opened the run
            self.store.write_weights(self.module.state_dict(), step)
        if prototypes is not False:
            options = dict(prototypes) if isinstance(prototypes, Mapping) else {}
            self.fit_prototypes(**options)
        if self.store is not None:
            self.store.release()  # training is over: other processes may write the run now
        return self.store

    @profiled("i2x::fit_prototypes")
    def fit_prototypes(self, **options):
        """Stage 2 on the model as it is now (the final model): PCA + k-means over the probe's
        layer features, assignments and exemplars, written to the run as ``prototypes``."""

        if self.rank != 0:
            return None
        device = run_device(self.module, self.device)
        # The same BatchNorm statistics as the records, so the assignment and the final saliency
        # describe one model.
        with recalibrated_batchnorm(self.module, self.calibration, device, self.calibration_batch):
            protos = discover_prototypes(self.module, self.layer, self.probe.images, batch_size=self.batch_size,
                                         device=self.device, reshape=self.explainer.reshape, **options)
        write_prototypes(self.store, protos)
        return protos

    @profiled("i2x::record_checkpoint")
    def record(self, step: int, final: bool = False) -> None:
        """Explain the probe set now and write it as checkpoint ``step``."""
        start, stop = self.probe.shard(self.rank, self.world)
        same_buffers = _rank0_buffers(self.module, _collective_device()) if self.world > 1 else contextlib.nullcontext()
        with same_buffers:
            saliency, probs = record_checkpoint(
                self.explainer, self.probe.images[start:stop], self.probe.labels[start:stop],
                batch_size=self.batch_size, device=self.device, calibration=self.calibration,
                calibration_batch=self.calibration_batch,
            )
        if self.world > 1:
            sizes = [stop - start for start, stop in (self.probe.shard(r, self.world) for r in range(self.world))]
            device = _collective_device()
            saliency = _gather_shards(saliency, sizes, device)
            probs = _gather_shards(probs, sizes, device)
        if self.rank == 0:
            assert self.store is not None  # rank 0 opened the run
            self.store.write_checkpoint(step, saliency, probs, final=final)
            if self.progress:
                acc = (probs.argmax(1) == self.probe.labels).float().mean().item()
                _progress.log(f"i2x: checkpoint at step {step} recorded ({len(self.probe)} probe samples, "
                              f"probe accuracy {acc:.3f})")
        self.finished.add(int(step))
        if self.world > 1:
            dist.barrier()
