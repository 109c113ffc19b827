"""One writer per run folder: an OS file lock (``flock``) on ``RUN/.i2x-lock``.

The first write of a process to a run takes the lock and keeps it until every :class:`RunStore`
of that process on that folder has released it (or the process ends: the OS drops the lock of a
dead process, so a crash never leaves a run locked). A second process that tries to write gets
:class:`RunLockedError` naming the writer's pid, before it has touched a file. Readers never lock:
every file is replaced atomically, so a reader sees the old file or the new one.

Only the standard library is used here.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from types import ModuleType

__all__ = ["LOCK_FILE", "RunLockedError", "acquire", "release", "writer_pid"]

LOCK_FILE = ".i2x-lock"

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # not POSIX: no OS lock to take; writes are then not guarded across processes
    fcntl = None


class RunLockedError(RuntimeError):
    """The run folder is being written by another process."""


# realpath of the run folder -> [fd, number of holders in this process]
_held: dict[str, list[int]] = {}


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker) is another process: it must not write under the
    # parent's lock, nor keep the lock alive after the parent dies.
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def writer_pid(folder: Path) -> int | None:
    """The pid recorded by the process that holds (or last held) the lock, if readable."""
    try:
        text = (Path(folder) / LOCK_FILE).read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def acquire(folder: Path) -> str:
    """Take (or share, within this process) the writer's lock of ``folder``; returns its key for
    :func:`release`. Raises :class:`RunLockedError` when another process holds it."""
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        return key
    if fcntl is None:
        _held[key] = [-1, 1]
        return key
    fd = os.open(Path(folder) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        pid = writer_pid(folder)
        who = f"pid {pid}" if pid is not None else "another process"
        raise RunLockedError(
            f"run {folder} is being written by {who}: wait for it to finish (or stop it), then run this again; "
            "reading the run meanwhile is safe") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = [fd, 1]
    return key


def release(key: str) -> None:
    """Give back one hold of the lock; the last one in this process unlocks the folder."""
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _held[key]
        if entry[0] >= 0:
            os.close(entry[0])  # closing the descriptor drops the flock
