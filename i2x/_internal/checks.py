"""Argument checks shared by every entry point, in one style: ``name: expected X, got Y``.

A value of the wrong kind (a string where an int belongs, a bool posing as a number) raises
TypeError; a value of the right kind outside its range raises ValueError. The command line turns
both into exit status 2.
"""

from __future__ import annotations

import math
import numbers
import operator
import re

import torch

__all__ = ["describe", "check_int", "check_number", "check_fraction", "check_positive_number", "check_plain_name"]


def describe(x) -> str:
    """What a value is, for error messages: ``float32 tensor of shape [2, 3]``, ``int 5``, ``list``."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return f"{type(x).__name__} {x!r}" if isinstance(x, (int, float, str)) else type(x).__name__


def _int_wanted(minimum: int | None) -> str:
    if minimum is None:
        return "an int"
    return "a positive int" if minimum == 1 else f"an int >= {minimum}"


def check_int(value, name: str, minimum: int | None = 1) -> int:
    """``value`` as an int >= ``minimum`` (None: any int). Python and numpy integers and 0-d
    integer tensors count; a bool does not, nor does 2.0."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected {_int_wanted(minimum)}, got {describe(value)}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name}: expected {_int_wanted(minimum)}, got {number!r}")
    return int(number)


def check_number(value, name: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """``value`` as a finite float within ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if high is not None:
        wanted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low == 0 and low_open:
        wanted = "a positive finite number"
    elif low is not None:
        wanted = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        wanted = "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {wanted}, got {describe(value)}")
    number = float(value)
    ok = math.isfinite(number) and (low is None or (number > low if low_open else number >= low))
    if not ok or (high is not None and number > high):
        raise ValueError(f"{name}: expected {wanted}, got {value!r}")
    return number


def check_fraction(value, name: str) -> float:
    """``value`` as a float in [0, 1]."""
    return check_number(value, name, 0, 1)


def check_positive_number(value, name: str) -> float:
    """``value`` as a finite float > 0."""
    return check_number(value, name, 0, low_open=True)


def check_plain_name(value, name: str) -> str:
    """``value`` as a name for a folder inside a run: letters, digits, '_' and '-' only, so that it
    can never name a path outside the run (no '/', no '..', not absolute)."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a plain name (letters, digits, '_', '-'), got {describe(value)}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise ValueError(f"{name}: expected a plain name (letters, digits, '_', '-'), got {value!r}")
    return value
