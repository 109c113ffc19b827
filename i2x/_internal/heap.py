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
    """Calls :func:`release_freed_heap` only once the resident size, read between batches, has
    grown ``margin`` bytes above its baseline: the lowest size read so far.

    Why: a trim walks the heap and returns its free pages, and the next batch faults them back
    in. Read right after a trim, the size is below a batch's working set, so a baseline taken
    there made every next batch look grown and trimmed after each (a resnet50 record at batch 10
    paid about 6% for it). Read between batches instead, the size is the working set plus the
    fragmentation built up since the last trim (about 3 MB a 224 px batch): the trim comes once
    that passes ``margin``, every couple of dozen batches. Growth that a trim could not return (read
    again above the margin right after one) is taken as the new baseline instead of being trimmed
    at every batch. Where the resident size cannot be read, every call trims."""

    def __init__(self, margin: int = 64 * 2**20, read=resident_bytes, trim=release_freed_heap) -> None:
        self.margin, self._read, self._trim = int(margin), read, trim
        self.baseline: int | None = None
        self.trims = 0
        self._just_trimmed = False

    def __call__(self) -> None:
        now = self._read()
        if now is None:
            self._trim()
            self.trims += 1
            return
        if self.baseline is None or now < self.baseline:
            self.baseline = now
        elif now > self.baseline + self.margin:
            if self._just_trimmed:  # the last trim could not return it: the new level, not fragmentation
                self.baseline = now
            else:
                self._trim()
                self.trims += 1
                self._just_trimmed = True
                return
        self._just_trimmed = False
