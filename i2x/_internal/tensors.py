"""Small tensor conversions the explainer, prototypes and the penalty all need."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["as_grid", "at_least_float32"]


def as_grid(t, name: str, reshape: Callable | None) -> torch.Tensor:
    """A layer's output as ``[B, C, h, w]`` (through ``reshape`` when given), or a clear error."""
    grid = reshape(t) if reshape is not None else t
    if not isinstance(grid, torch.Tensor) or grid.dim() != 4:
        shape = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__
        raise ValueError(
            f"layer {name!r} gives {shape}, not a 4-D [B, C, h, w] grid; pass reshape= to turn it into one "
            "(i2x.vit_reshape for ViT tokens, i2x.swin_reshape for Swin)"
        )
    return grid


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors as float32 (sums over a grid lose too much in 16 bits); others as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
