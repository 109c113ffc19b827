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


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another OS)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_heap() -> None:
    """Hand the free pages of the C heap back to the OS (glibc ``malloc_trim(0)``; elsewhere nothing).

    Why: an explain pass frees tens of MB of activations and gradients per batch. glibc's dynamic
    mmap threshold serves such blocks from the heap once one has been freed, and the heap then
    fragments: the resident memory of a long streamed record grew by about 3 MB per 224 px batch of
    64 (880 MB over 20,000 images) with nothing kept alive. Trimming after each large batch kept
    it flat at no measurable cost (benchmarks/RESULTS.md).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
