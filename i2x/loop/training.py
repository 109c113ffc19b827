"""Training and fine-tuning: an ordinary torch loop, fast on the CPU, evaluated with BatchNorm
statistics recomputed on fixed training images.

:func:`finetune` takes any ``Dataset`` (ours and the wrappers of ``i2x.loop.targets`` are read a batch at
a time), a ``Sampler`` (``Targets.sampler``) or a ``DataLoader`` of the user's, and an optional
:class:`~i2x.loop.penalty.ExplanationPenalty`. :func:`train` is the same loop with i2x's training recipe
(the one ``i2x train`` and the experiments use), calling an online ``Tracker`` at every step.
:func:`evaluate` gives accuracy, per-class accuracy and the confusion matrix.

Speed (``benchmarks/bench_training.py``): where the CPU has native bfloat16 (AVX512-BF16 / AMX)
the forward runs under bfloat16 autocast with float32 master weights, and the model and its inputs
are kept channels-last. ``precision="fp32"`` turns both off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from i2x._internal.checks import check_int, check_number, describe
from i2x._internal.memory import check_memory_budget
from i2x._internal.modules import checked_forward, eval_mode, run_device, unwrap_model
from i2x._internal.progress import bar as progress_bar
from i2x.data import batch_of, labels_of
from i2x.explain.batching import forward_batch_size
from i2x.loop.penalty import ExplanationPenalty
from i2x.loop.rrr import RRRPenalty
from i2x.loop.strategies import epoch_permutation
from i2x.track.batchnorm import calibration_rows, recalibrated_batchnorm

__all__ = [
    "TRAIN_LR",
    "FINETUNE_LR_FACTOR",
    "PRECISIONS",
    "resolve_precision",
    "calibration_images",
    "finetune",
    "train",
    "evaluate",
    "FitStats",
]

#: i2x's training recipe: SGD with momentum, this learning rate, cosine decay (``train``).
TRAIN_LR = 0.05
#: Fine-tuning's default learning rate is this share of the training learning rate.
FINETUNE_LR_FACTOR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
PRECISIONS = ("auto", "bf16", "fp32")
CALIBRATION_SIZE = 2048


@dataclass
class FitStats:
    """What one call of the loop did."""

    steps: int
    samples: int
    seconds: float
    mean_loss: float
    mean_penalty: float
    precision: str
    channels_last: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"``: ``auto`` is bf16 where the device computes it natively (a CPU
    with AVX512-BF16/AMX, a CUDA device that supports it), fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cpu":
        return "bf16" if _cpu_has_bf16() else "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def calibration_images(dataset, n: int = CALIBRATION_SIZE, seed: int = 0) -> torch.Tensor | None:
    """``n`` fixed training images (a stratified, seeded subset) for recomputing BatchNorm
    statistics before every evaluation."""
    rows = calibration_rows(labels_of(dataset), n, seed)
    return None if rows is None else batch_of(dataset, rows)[0]


def _epoch_batches(data, sampler, order, batch_size: int, seed: int, epoch: int, shuffle: bool):
    """Yields ``(positions or None, images, labels)`` for one epoch."""
    if isinstance(data, DataLoader):
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError(f"the DataLoader must yield (images, labels) batches, got {describe(batch)}")
            yield None, batch[0], batch[1]
        return
    if order is not None:
        positions = order(epoch) if callable(order) else torch.as_tensor(order, dtype=torch.int64)
    elif sampler is not None:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        positions = torch.as_tensor(list(sampler), dtype=torch.int64)
    elif shuffle:
        positions = epoch_permutation(len(data), seed, epoch)
    else:
        positions = torch.arange(len(data))
    for start in range(0, positions.numel(), batch_size):
        idx = positions[start:start + batch_size]
        x, y = batch_of(data, idx)
        yield idx, x, y


def _dataset_positions(data, positions):
    """Positions in the dataset the penalty was built on (a Subset's positions are translated)."""
    while isinstance(data, Subset):
        positions = torch.as_tensor(data.indices, dtype=torch.int64)[positions]
        data = data.dataset
    return positions


def fit(
    model: nn.Module,
    data,
    epochs: int,
    lr: float,
    *,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    schedule: str = "constant",
    batch_size: int = 128,
    seed: int = 0,
    sampler: Sampler | None = None,
    order=None,
    penalty: ExplanationPenalty | RRRPenalty | None = None,
    precision: str = "auto",
    channels_last: bool | None = None,
    device=None,
    on_step: Callable[[int], object] | None = None,
    progress: bool = False,
    desc: str = "training",
) -> FitStats:
    """The loop behind :func:`finetune` and :func:`train` (see there)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    if not isinstance(data, (Dataset, DataLoader)) and not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise TypeError(f"data: expected a torch Dataset or DataLoader, got {describe(data)}")
    epochs = check_int(epochs, "epochs")
    batch_size = check_int(batch_size, "batch_size")
    lr = check_number(lr, "lr", 0, low_open=True)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule: expected 'constant' or 'cosine', got {schedule!r}")
    if isinstance(data, DataLoader) and (sampler is not None or order is not None):
        raise ValueError("data is a DataLoader: give the sampler to the DataLoader, not to finetune")
    if penalty is not None and isinstance(data, DataLoader):
        raise ValueError("the explanation penalty needs each batch's dataset positions: "
                         "pass the Dataset, not a DataLoader")
    if len(data) == 0:
        raise ValueError("data: the dataset is empty")
    module = unwrap_model(model)
    device = run_device(module, device)
    prec = resolve_precision(precision, device)
    # Channels-last only where it is both faster and safe: with bfloat16 on the CPU (1.25x on top of
    # bf16's 2x here). In float32, oneDNN's channels-last convolution backward crashed (SIGSEGV)
    # for some small shapes on 2 threads with torch 2.14.1 (widths 8/16/32, 16 x 16 inputs, batch 3).
    cl = (device.type == "cpu" and prec == "bf16") if channels_last is None else bool(channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = optimizer(params) if optimizer is not None else torch.optim.SGD(
        params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer: the factory must return a torch.optim.Optimizer, got {describe(opt)}")
    if optimizer is not None:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    steps_per_epoch = _steps_per_epoch(data, sampler, order, batch_size)
    total = epochs * steps_per_epoch
    sched = None
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    bar = progress_bar(total=total, desc=desc, unit="step", enabled=progress)
    converted = cl and _to_channels_last(model)
    # A term with ``wants_input_gradient`` (RRR) is called on the input, which then needs a gradient;
    # any other term (ExplanationPenalty) on the activations its explainer captures.
    wants_input = bool(getattr(penalty, "wants_input_gradient", False))
    capture = None if penalty is None or wants_input else cast(ExplanationPenalty, penalty).explainer.capture
    was_training = [(m, m.training) for m in model.modules()]
    started = time.perf_counter()
    step = samples = 0
    loss_sum = pen_sum = 0.0
    try:
        model.train()
        for epoch in range(epochs):
            for positions, x, y in _epoch_batches(data, sampler, order, batch_size, seed, epoch, shuffle=True):
                x = x.to(device, non_blocking=True)
                y = torch.as_tensor(y).to(device, non_blocking=True).long()
                if cl and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                if wants_input:
                    x = x.detach().requires_grad_(True)
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                    if capture is not None:
                        with capture() as captured:
                            logits = model(x)
                    else:
                        logits = checked_forward(model, x, "images")
                logits = logits.float()
                if step == 0:
                    _check_labels(y, logits)
                loss = F.cross_entropy(logits, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the training loss became {float(loss.detach())} at step {step + 1}: "
                                             "lower the learning rate or check the data for NaN")
                total_loss = loss
                if penalty is not None:
                    pen = penalty(x if wants_input else captured, logits, y, _dataset_positions(data, positions))
                    total_loss = loss + pen
                    pen_sum += float(pen.detach())
                total_loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                samples += int(y.numel())
                loss_sum += float(loss.detach())
                bar.update(1)
                if on_step is not None:
                    on_step(step)
    finally:
        bar.close()
        for m, mode in was_training:
            m.training = mode
        if converted:
            model.to(memory_format=torch.contiguous_format)
    return FitStats(step, samples, time.perf_counter() - started, loss_sum / max(step, 1), pen_sum / max(step, 1),
                    prec, cl)


def _check_labels(y: torch.Tensor, logits: torch.Tensor) -> None:
    """Labels the model has no output for, as one clear error (cross_entropy's is an IndexError
    deep inside, or a device assert on CUDA)."""
    if logits.dim() != 2:
        raise ValueError(f"the model's output must be [batch, classes] logits, got shape {list(logits.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"labels: the model has {logits.shape[1]} outputs but the data hold labels from "
                         f"{int(y.min())} to {int(y.max())}")


def _steps_per_epoch(data, sampler, order, batch_size: int) -> int:
    if isinstance(data, DataLoader):
        return len(data)
    if order is not None:
        n = (order(0) if callable(order) else torch.as_tensor(order)).numel()
    elif sampler is not None:
        n = len(sampler)
    else:
        n = len(data)
    return -(-n // batch_size)


def _to_channels_last(model: nn.Module) -> bool:
    """Puts 4-D parameters in channels-last; True when anything changed (to undo afterwards)."""
    changed = any(p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters())
    if changed:
        model.to(memory_format=torch.channels_last)
    return changed


def finetune(
    model: nn.Module,
    data,
    epochs: int = 1,
    lr: float | None = None,
    *,
    train_lr: float = TRAIN_LR,
    optimizer: Callable | None = None,
    batch_size: int = 128,
    seed: int = 0,
    sampler: Sampler | None = None,
    order=None,
    penalty: ExplanationPenalty | RRRPenalty | None = None,
    precision: str = "auto",
    channels_last: bool | None = None,
    device=None,
    progress: bool = False,
) -> FitStats:
    """Fine-tune ``model`` in place: an ordinary loop of SGD (momentum 0.9, weight decay 5e-4) at
    a constant ``lr`` (default ``0.1 * train_lr``), or the optimizer ``optimizer(params)`` makes.

    Args:
        data: a ``Dataset`` of ``(image, label)`` (read a batch at a time where it can be: an
            ``i2x.data.ImageDataset``, the ``i2x.loop.targets`` wrappers and subsets) or a ``DataLoader``.
        sampler: positions per epoch (``Targets.sampler``, any ``Sampler``); default a seeded shuffle.
        order: explicit positions per epoch (a tensor, or ``epoch -> tensor``), instead of a sampler.
        penalty: a loss term added to the cross-entropy: an :class:`~i2x.loop.penalty.ExplanationPenalty`
            (on the captured activations) or an :class:`~i2x.loop.rrr.RRRPenalty` (on the input gradient).
        precision: ``auto`` (bfloat16 autocast where the device has it natively), ``bf16``, ``fp32``.
        channels_last: keep model and inputs channels-last (default: on the CPU under bfloat16, where
            it is faster; float32 stays NCHW, see ``fit``); the parameters get their layout back afterwards.

    The model's train/eval flags are restored afterwards. Returns :class:`FitStats`.
    """
    lr = FINETUNE_LR_FACTOR * check_number(train_lr, "train_lr", 0, low_open=True) if lr is None else lr
    return fit(model, data, epochs, lr, optimizer=optimizer, batch_size=batch_size, seed=seed, sampler=sampler,
               order=order, penalty=penalty, precision=precision, channels_last=channels_last, device=device,
               progress=progress, desc="fine-tuning")


def train(model: nn.Module, data, epochs: int, lr: float = TRAIN_LR, *, batch_size: int = 128, seed: int = 0,
          tracker=None, precision: str = "auto", channels_last: bool | None = None, device=None,
          progress: bool = False) -> FitStats:
    """i2x's training recipe: SGD (momentum 0.9, weight decay 5e-4), ``lr`` with cosine decay to 0
    over ``epochs``, seeded shuffles; ``tracker.step(step)`` after every step when a ``Tracker`` is given."""
    on_step = tracker.step if tracker is not None else None
    return fit(model, data, epochs, lr, schedule="cosine", batch_size=batch_size, seed=seed, precision=precision,
               channels_last=channels_last, device=device, on_step=on_step, progress=progress)


def _first_image(data) -> torch.Tensor:
    return batch_of(data, torch.zeros(1, dtype=torch.int64))[0]


def evaluate(model: nn.Module, data, calibration: torch.Tensor | None = None, batch_size: int | None = None,
             device=None, num_classes: int | None = None, memory_budget: float | None = None) -> dict:
    """Accuracy of ``model`` on ``data`` in eval mode, float32, with BatchNorm statistics recomputed
    on ``calibration`` images first (and put back afterwards; None: the model's own).
    ``batch_size``: images per forward; None: as many as ``memory_budget`` MiB hold (default 256
    MiB, at most 256 images; docs/memory.md).

    Returns ``{"accuracy", "per_class" [M], "confusion" [M][M] (rows: true, columns: predicted),
    "n"}`` with plain Python numbers.
    """

    module = unwrap_model(model)
    device = run_device(module, device)
    if len(data) == 0:
        raise ValueError("data: the evaluation set is empty")
    check_memory_budget(memory_budget)
    if batch_size is None:  # a DataLoader brings its own batches
        batch_size = 1 if isinstance(data, DataLoader) else forward_batch_size(
            module, _first_image(data), memory_budget, in_flight=0, device=device)
    batch_size = check_int(batch_size, "batch_size")
    preds, labels = [], []
    with recalibrated_batchnorm(module, calibration, device), eval_mode(module), torch.no_grad():
        for _, x, y in _epoch_batches(data, None, None, batch_size, 0, 0, shuffle=False):
            logits = checked_forward(module, x.to(device), "images").float()
            if not bool(torch.isfinite(logits).all()):
                raise ValueError("the model's output holds NaN or inf on the evaluation data")
            preds.append(logits.argmax(1).cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    p, y = torch.cat(preds), torch.cat(labels)
    m = int(num_classes) if num_classes is not None else int(max(int(y.max()), int(p.max())) + 1)
    confusion = torch.bincount(y * m + p, minlength=m * m).view(m, m)
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double())
    return {"accuracy": float((p == y).double().mean()), "per_class": per_class.tolist(),
            "confusion": confusion.tolist(), "n": int(y.numel())}
