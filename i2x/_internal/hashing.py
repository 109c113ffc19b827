"""Short sha256 fingerprints of tensors, state dicts and files: how a run notices that what an
analysis, a report or an experiment was computed from has changed underneath it.

The digests are stored in run folders, so their recipes must never change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["tensor_bytes", "bytes_digest", "tensor_digest", "state_digest", "file_digest"]

# 16 hex digits (64 bits): a fingerprint, not a security boundary.
_DIGITS = 16


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` (on the CPU, contiguous), through a uint8 view: works for every
    dtype, bfloat16 included (numpy has none)."""
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def bytes_digest(*chunks: bytes) -> str:
    """The chunks, in order."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:_DIGITS]


def tensor_digest(*tensors: torch.Tensor) -> str:
    """The shapes and bytes of ``tensors``, in order."""
    return bytes_digest(*(part for t in tensors for part in (str(list(t.shape)).encode(), tensor_bytes(t))))


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A state dict's names and bytes, in sorted order of the names."""
    return bytes_digest(*(part for k in sorted(state) for part in (k.encode(), tensor_bytes(state[k]))))


def file_digest(path: str | Path) -> str:
    """The bytes of the file at ``path``, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:_DIGITS]
