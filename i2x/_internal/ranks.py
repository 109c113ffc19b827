"""Independent work (an experiment's cells) shared among the processes ``torchrun`` starts.

No scheduler of our own: torchrun starts the processes (on one machine or many, with its own
rendezvous) and tells each its rank in the environment; each process takes every ``world``-th
piece of the work, and the processes meet only to agree that everyone got through a phase
(:func:`agree`) so that rank 0 can write what the others wrote.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["process_group", "share", "agree", "rank_device"]

T = TypeVar("T")


def process_group(timeout: timedelta | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process. Under torchrun (``WORLD_SIZE`` > 1 in the
    environment) it joins the process group torchrun describes, with gloo: only small control
    messages pass between the ranks, so the CPU backend serves CPU and GPU work alike. A group the
    caller already set up is used as it is; a plain process is ``(0, 1)``. ``timeout``: how long a
    rank waits for the others to join (torch's default when None)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not dist.is_available():
            raise RuntimeError(f"WORLD_SIZE={world} asks for {world} processes; this torch has no torch.distributed")
        if timeout is None:
            dist.init_process_group("gloo")
        else:
            dist.init_process_group("gloo", timeout=timeout)
        # A gloo group still alive when the interpreter finalises aborts the process ("terminate
        # called without an active exception") about one exit in three; the group we opened is
        # closed while Python is still whole.
        atexit.register(_close_group)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's share of ``items``: every ``world``-th one from position ``rank``."""
    return list(items)[rank::world]


def agree(error: BaseException | None, world: int, what: str) -> None:
    """Wait until every rank got here, then raise on every rank if any of them failed (``error``:
    this rank's failure, or None). Without it a rank whose work failed would leave the others
    waiting for it forever."""
    if world == 1:
        if error is not None:
            raise error
        return
    failures: list[str | None] = [None] * world
    dist.all_gather_object(failures, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, text) for rank, text in enumerate(failures) if text is not None]
    if failed:
        rank, text = failed[0]
        raise RuntimeError(f"{what}: rank {rank} failed ({text})")


def rank_device(device, world: int):
    """``device`` for this process: a bare ``"cuda"`` becomes the GPU torchrun gave the process
    (``LOCAL_RANK``) when there are several processes; anything else is kept."""
    if world > 1 and device is not None and torch.device(device) == torch.device("cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
