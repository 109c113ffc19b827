"""Progress bars and status lines for long steps, one policy for the whole package.

A bar shows only where someone watches: tqdm's own rule (``disable=None``) hides it when stderr
is not a terminal, so logs and CI output stay clean, and the command line's ``--quiet`` / ``--json``
hide it everywhere (:func:`configure`). Status lines go to stderr, so ``--json`` keeps stdout a
single JSON document. Only the standard library is imported here: the command line configures it
before torch is loaded.
"""

from __future__ import annotations

import sys

__all__ = ["configure", "quiet", "bar", "log"]

_state = {"quiet": False}


def configure(*, quiet: bool) -> None:
    """Silence (or re-enable) every bar and status line of this process."""
    _state["quiet"] = bool(quiet)


def quiet() -> bool:
    return _state["quiet"]


def bar(iterable=None, *, total=None, desc: str | None = None, unit: str = "it", enabled: bool = True,
        leave: bool = False):
    """A tqdm bar on stderr; off when ``enabled`` is False, when configured quiet, or when stderr is
    not a terminal."""
    from tqdm import tqdm

    disable = True if (not enabled or _state["quiet"]) else None
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, file=sys.stderr,
                dynamic_ncols=True)


def log(message: str) -> None:
    """One status line on stderr (nothing when configured quiet)."""
    if not _state["quiet"]:
        print(message, file=sys.stderr, flush=True)
