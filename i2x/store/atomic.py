"""Writing a file so that readers see the old version or the new one, never half of either: a
temporary file beside the target, flushed and fsynced, then renamed over it. A failed write (a
full disk) leaves the previous version and names the file it could not write."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_save_tensors", "TMP_PREFIX"]

#: Temporary files start with this; a run folder's readers skip them.
TMP_PREFIX = ".i2x-tmp-"




def _fsync_dir(directory: Path) -> None:
    # The rename itself must reach the disk, or a crash can forget it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# The mode an ordinary open() would give a new file (read once: os.umask can only be read by setting it).
_FILE_MODE = _file_mode()


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
        os.close(fd)
        write(tmp)
        # After the write: mkstemp's 0600 would make the run unreadable to others, and a writer that
        # replaces the file (safetensors' save_file does) creates it 0600 again.
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, SafetensorError)):
            # A full disk or a failed write: the old file (if any) is untouched; say which file.
            code, why = _os_error(e)
            raise OSError(code, f"could not write {path}: {why}; the previous version (if any) is kept") from e
        raise
    _fsync_dir(path.parent)


def _os_error(e: BaseException) -> tuple[int | None, str]:
    """``(errno, reason)`` of a failed write. safetensors reports the OS error only inside its
    message ("I/O error: No space left on device (os error 28)"): read the code from there."""
    code = getattr(e, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(e))
        code = int(found.group(1)) if found else None
    reason = getattr(e, "strerror", None) or (os.strerror(code) if code is not None else str(e))
    return code, reason


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never half."""

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_write(Path(path), write)


def atomic_write_json(path: Path | str, obj) -> None:
    """``obj`` as indented JSON (no NaN: a run's records are strict JSON), written atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """``tensors`` (moved to the CPU, contiguous) as a safetensors file, written atomically."""
    prepared = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensor {key!r} for {path.name}: expected a torch.Tensor, got {type(value).__name__}")
        prepared[key] = value.detach().to("cpu").contiguous()
    _atomic_write(path, lambda tmp: save_file(prepared, tmp, metadata=metadata))
