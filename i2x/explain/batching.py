"""Default batch sizes for the passes that explain or evaluate a model, from a memory budget
(:func:`i2x._internal.memory.auto_batch_size`; docs/memory.md)."""

from __future__ import annotations

import torch
from torch import nn

from i2x._internal.memory import auto_batch_size
from i2x._internal.modules import checked_forward, eval_mode, run_device
from i2x.explain.explainer import Explainer

__all__ = ["explain_batch_size", "forward_batch_size", "weight_bytes"]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers: what the budget keeps for the copies of the
    weights a backend makes while it runs them (oneDNN's reordered weights)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _image(sample, device: torch.device) -> torch.Tensor:
    """One image ``[C, H, W]`` of a tensor batch, a streamed probe view or a single image."""
    image = sample[0] if (isinstance(sample, torch.Tensor) and sample.dim() == 4) or not isinstance(
        sample, torch.Tensor) else sample
    return image.to(device)


def _sized(model: nn.Module, step, image: torch.Tensor, budget_mib, in_flight: int, name: str,
           target: torch.device) -> int:
    """Check that ``model`` takes ``image`` (an error names ``name``), then size the batch; the
    random number generators are left as they were (a model may draw in eval mode too, and the
    sizing must not change what the user's training draws next)."""
    with torch.random.fork_rng(devices=[target.index or 0] if target.type == "cuda" else []):
        with eval_mode(model), torch.no_grad():
            checked_forward(model, image.unsqueeze(0), name)
        return auto_batch_size(step, image, budget_mib, in_flight=in_flight, reserve_bytes=weight_bytes(model))


def explain_batch_size(explainer: Explainer, sample, budget_mib: float | None = None, *, in_flight: int = 1,
                       device=None, name: str = "images") -> int:
    """Images per :meth:`Explainer.explain` call (raw grids, logits kept) that fit ``budget_mib``
    (None: the default budget) on the device it runs on; ``sample``: the images or one of them
    (``name``: what an error calls them)."""
    target = run_device(explainer.model, device)
    image = _image(sample, target)

    def step(x: torch.Tensor) -> None:
        with eval_mode(explainer.model):
            explainer.explain(x, targets=0, size=None, normalize=False, return_logits=True)

    return _sized(explainer.model, step, image, budget_mib, in_flight, name, target)


def forward_batch_size(model: nn.Module, sample, budget_mib: float | None = None, *, in_flight: int = 1,
                       device=None, name: str = "images") -> int:
    """Images per eval-mode forward under ``no_grad`` (evaluation, layer features) that fit
    ``budget_mib`` (None: the default budget)."""
    target = run_device(model, device)
    image = _image(sample, target)

    def step(x: torch.Tensor) -> None:
        with eval_mode(model), torch.no_grad():
            model(x)

    return _sized(model, step, image, budget_mib, in_flight, name, target)
