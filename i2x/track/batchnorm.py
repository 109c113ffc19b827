"""BatchNorm running statistics recomputed on fixed images for a while, then put back: how every
record, evaluation and target score of a run sees the same model whatever the last training
batches were."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from i2x._internal.modules import checked_forward, eval_mode
from i2x.data import stratified_subset
from i2x.explain.batching import forward_batch_size
from i2x.track.streamed import StreamedImages, iter_batches

__all__ = ["recalibrated_batchnorm", "calibration_batch_size", "calibration_rows", "CALIBRATION_BATCH"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Statistics averaged over batches depend (slightly) on the batch size, so it must not follow the
# probe batch: it is at most this many images...
CALIBRATION_BATCH = 256
# ...and fewer where a train-mode forward of 256 would not fit the memory budget (224 px images:
# resnet50 fits 11 in the default 256 MiB). That size is a function of the model, the image size
# and the budget only, so every recalibration of one run (records, targets, evaluations, every
# rank) with the same budget uses the same batch and gets the same statistics.


def _running_stats(m: nn.modules.batchnorm._NormBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(running_mean, running_var, num_batches_tracked)`` of a norm that tracks running statistics."""
    mean, var, count = m.running_mean, m.running_var, m.num_batches_tracked
    assert mean is not None and var is not None and count is not None  # track_running_stats is set
    return mean, var, count


def calibration_batch_size(model: nn.Module, images, device, memory_budget: float | None = None) -> int:
    """Images per train-mode forward of the recalibration: :data:`CALIBRATION_BATCH`, or as many as
    ``memory_budget`` MiB hold when fewer (its activations are those of an eval-mode forward)."""
    in_flight = 2 * images.num_workers if isinstance(images, StreamedImages) else 1
    fits = forward_batch_size(model, images, memory_budget, in_flight=in_flight, device=device, name="probe images")
    return min(CALIBRATION_BATCH, fits)


@contextlib.contextmanager
def recalibrated_batchnorm(
    model: nn.Module, images: torch.Tensor | None, device, batch_size: int | None = None,
    memory_budget: float | None = None,
):
    """BatchNorm running statistics recomputed on fixed ``images`` for the duration, then put back.

    During training the running statistics trail the weights (an exponential average over recent
    batches), so eval-mode outputs jitter from one checkpoint to the next for reasons unrelated to
    what the model learned (a replication here: test accuracy moved 89.2-91.0% within one epoch from this
    alone). Recomputing them on the same images at every checkpoint removes that noise from the
    records. The model's own statistics, momenta and modes are restored afterwards.

    ``batch_size``: images per train-mode forward; None: :func:`calibration_batch_size` for
    ``memory_budget`` (default 256 MiB).
    """
    norms = [m for m in model.modules() if isinstance(m, _BATCHNORMS) and m.track_running_stats]
    if images is None or images.shape[0] == 0 or not norms:
        yield
        return
    if batch_size is None:
        batch_size = calibration_batch_size(model, images, device, memory_budget)
    saved = [(m, m.momentum, tuple(t.clone() for t in _running_stats(m))) for m in norms]
    try:
        with eval_mode(model), torch.no_grad():
            for m in norms:
                m.reset_running_stats()
                m.train()
            for start, batch in iter_batches(images, batch_size):
                # A momentum of b / (seen + b) makes the running statistics the sample-weighted
                # mean over the batches: a short last batch counts for its size, not as much as a
                # full one.
                for m in norms:
                    m.momentum = batch.shape[0] / (start + batch.shape[0])
                checked_forward(model, batch.to(device, non_blocking=True), "probe images")
        yield
    finally:
        with torch.no_grad():
            for m, momentum, stats in saved:
                m.momentum = momentum
                for running, value in zip(_running_stats(m), stats, strict=True):
                    running.copy_(value)


def calibration_rows(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor | None:
    """Which of the samples with ``labels`` are the ``n`` calibration images (a stratified, seeded
    subset; all of them when there are fewer), or None for ``n == 0`` (no recalibration). The
    tracker, the target scoring and the evaluations all choose them this way, so they agree."""
    if n == 0:
        return None
    return stratified_subset(labels, min(int(n), labels.numel()), seed=seed)
