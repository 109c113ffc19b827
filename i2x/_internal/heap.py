"""Giving the C heap's free pages back to the operating system."""

from __future__ import annotations

import functools

__all__ = ["release_freed_heap", "resident_bytes", "GrowthTrimmer"]


@functools.lru_cache(maxsize=1)
def glibc_malloc_trim():
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
    trim = glibc_malloc_trim()
    if trim is not None:
        trim(0)


def resident_bytes() -> int | None:
    """The process's resident size (``/proc/self/statm``), or None where there is no such file."""
    import os

    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class GrowthTrimmer:
    """Calls :func:`release_freed_heap` only once the resident size has grown ``margin`` bytes
    above what it was after the last trim (or at the first call).

    Why: a trim walks the heap and returns its free pages, and the next batch faults them back
    in, a cost paid at every batch when trimming after each (about 2% of a resnet50 record at
    batch 10). Fragmentation builds up over many batches, so trimming when it has built up keeps
    the resident size within ``margin`` of the floor at a fraction of the calls. Where the
    resident size cannot be read, every call trims."""

    def __init__(self, margin: int = 16 * 2**20, read=resident_bytes, trim=release_freed_heap) -> None:
        self.margin, self._read, self._trim = int(margin), read, trim
        self.floor: int | None = None
        self.trims = 0

    def __call__(self) -> None:
        now = self._read()
        if now is None:
            self._trim()
            self.trims += 1
            return
        if self.floor is None:
            self.floor = now
        elif now > self.floor + self.margin:
            self._trim()
            self.trims += 1
            self.floor = self._read() or now
