"""Small helpers shared by the Python modules: how a bad argument is described in an error, and
putting a model in eval mode for a while without losing any submodule's own mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def describe(x) -> str:
    """What a value is, for error messages: ``float32 tensor of shape [2, 3]``, ``int 5``, ``list``."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return f"{type(x).__name__} {x!r}" if isinstance(x, (int, float, str)) else type(x).__name__


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then every submodule's own ``training`` flag back, also on
    error (``model.train(was_training)`` would flip submodules the user froze in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
