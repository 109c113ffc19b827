"""Small helpers shared by the Python modules: how a bad argument is described in an error, the
number checks of the stage-9 modules, putting a model in eval mode for a while without losing
any submodule's own mode, and naming i2x's work in profiler traces."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Iterator

import torch
from torch import nn


def profiled(name: str):
    """Decorator: the call shows up as ``name`` (e.g. ``i2x::explain``) in ``torch.profiler``
    traces, so a user profiling their own training loop sees i2x's share by name. Costs a few
    microseconds per call when no profiler runs."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)

        return inner

    return wrap


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


def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (a bool is not an int here), or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return int(value)


def check_number(value, name: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """``value`` as a finite float within ``[low, high]`` (``(low, high]`` with ``low_open``), or
    ValueError naming ``name`` and the range."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        if high is not None:
            what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low == 0 and low_open:
            what = "a positive finite number"
        elif low is not None:
            what = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            what = "a finite number"
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return float(value)
