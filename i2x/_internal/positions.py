"""Which row of a per-sample table a dataset position has: the lookup the loss terms that act on
some training samples (the explanation penalty, RRR) share."""

from __future__ import annotations

import torch

__all__ = ["row_table", "rows_at"]


def row_table(positions: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]`` int64: at ``positions[j]`` the row ``j``, -1 at every other position."""
    table = torch.full((int(n),), -1, dtype=torch.int64)
    table[positions] = torch.arange(positions.numel())
    return table


def rows_at(table: torch.Tensor, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, hit)`` for a batch's dataset ``indices``: each one's row (-1 for none, also past the
    table's end) and the batch positions that have one."""
    indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
    known = indices < table.numel()
    rows = torch.full_like(indices, -1)
    rows[known] = table[indices[known]]
    return rows, (rows >= 0).nonzero().flatten()
