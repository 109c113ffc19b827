"""The kernel benchmark cases: each i2x op beside its best eager-torch composite, at the shapes the
issue names. Shared by the pytest-benchmark tests (bench_ops.py) and the table script
(run_ops_table.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from i2x import ops


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    shape: str
    goal: str  # what the issue asks, in words
    goal_speedup: float  # eager time / i2x time must reach this
    make: Callable[[str], dict]  # device -> inputs
    i2x: Callable[[dict], object]
    eager: Callable[[dict], object]
    bytes_moved: Callable[[dict], int] | None = None  # for memory-bound ops: minimal traffic


# ---------------------------------------------------------------------------------------------
# cam + upsample_normalize: B=64, C=2048, 7x7 -> 224x224


def _make_cam(device: str, batch: int = 64, channels: int = 2048, grid: int = 7) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    act = torch.rand(batch, channels, grid, grid, generator=g).to(device)
    grad = torch.randn(batch, channels, grid, grid, generator=g).to(device)
    return {"act": act, "grad": grad, "size": (224, 224)}


def _cam_i2x(x: dict):
    return ops.upsample_normalize(ops.cam(x["act"], x["grad"]), x["size"])


def _cam_eager(x: dict):
    weights = x["grad"].mean(dim=(2, 3))
    cam = torch.einsum("bc,bchw->bhw", weights, x["act"]).clamp_(min=0)
    up = F.interpolate(cam[:, None], size=x["size"], mode="bilinear", align_corners=False)[:, 0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    rng = up.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(rng > 0, (up - lo) / rng.clamp(min=torch.finfo(up.dtype).tiny), 0.0)


def _cam_bytes(x: dict) -> int:
    b = x["act"].shape[0]
    return 2 * x["act"].numel() * 4 + b * x["size"][0] * x["size"][1] * 4


# ---------------------------------------------------------------------------------------------
# prototype_assign: 1M positions, C=512 -> D=64 (PCA), K=128


def _make_assign(device: str, positions: int = 1_003_520, channels: int = 512, dims: int = 64, clusters: int = 128) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    grid = 7
    batch = positions // (grid * grid)
    feats = torch.empty(batch, channels, grid, grid)
    feats.uniform_(0, 1, generator=g)
    comps = torch.linalg.qr(torch.randn(channels, dims, generator=g))[0].contiguous()
    return {
        "features": feats.to(device),
        "mean": torch.full((channels,), 0.5).to(device),
        "components": comps.to(device),
        "centroids": (torch.randn(clusters, dims, generator=g) * 0.5).to(device),
    }


def _assign_i2x(x: dict):
    return ops.prototype_assign(x["features"], x["centroids"], x["mean"], x["components"])


def _assign_eager(x: dict):
    f = x["features"]
    rows = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    projected = (rows - x["mean"]) @ x["components"]
    return torch.cdist(projected, x["centroids"]).argmin(dim=1).reshape(f.shape[0], f.shape[2], f.shape[3])


# ---------------------------------------------------------------------------------------------
# prototype_pool and saliency_pool: B=256, C=512, 7x7, K=128


def _make_pool(device: str, batch: int = 256, channels: int = 512, grid: int = 7, clusters: int = 128) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    return {
        "features": torch.randn(batch, channels, grid, grid, generator=g).to(device),
        "saliency": torch.rand(batch, grid, grid, generator=g).to(device),
        "assignment": torch.randint(0, clusters, (batch, grid, grid), generator=g).to(device),
        "k": clusters,
    }


def _prototype_pool_i2x(x: dict):
    return ops.prototype_pool(x["saliency"], x["assignment"], x["k"])


def _prototype_pool_eager(x: dict):
    b = x["saliency"].shape[0]
    index = x["assignment"].reshape(b, -1)
    values = x["saliency"].reshape(b, -1)
    sums = values.new_zeros(b, x["k"]).scatter_add_(1, index, values)
    counts = torch.zeros(b, x["k"], dtype=torch.int64, device=values.device).scatter_add_(1, index, torch.ones_like(index))
    return sums / counts.clamp(min=1), counts


def _saliency_pool_i2x(x: dict):
    return ops.saliency_pool(x["features"], x["saliency"])


def _saliency_pool_eager(x: dict):
    s = x["saliency"]
    total = s.sum(dim=(1, 2))
    pooled = torch.bmm(x["features"].flatten(2), s.flatten(1)[:, :, None])[:, :, 0]
    return torch.where(total[:, None] != 0, pooled / total[:, None], 0.0)


def _saliency_pool_bytes(x: dict) -> int:
    return x["features"].numel() * 4 + x["saliency"].numel() * 4 + x["features"].shape[0] * x["features"].shape[1] * 4


CASES = [
    Case("cam+upsample_normalize", "B=64 C=2048 7x7 -> 224x224", ">= 1.5x eager", 1.5, _make_cam, _cam_i2x, _cam_eager, _cam_bytes),
    Case("prototype_assign", "1M positions C=512 -> D=64 K=128", ">= 1.5x cdist+argmin, <= 1/10 its peak extra memory", 1.5,
         _make_assign, _assign_i2x, _assign_eager),
    Case("prototype_pool", "B=256 7x7 K=128", ">= 2x eager (scatter_add)", 2.0, _make_pool, _prototype_pool_i2x, _prototype_pool_eager),
    Case("saliency_pool", "B=256 C=512 7x7", ">= 2x eager (bmm)", 2.0, _make_pool, _saliency_pool_i2x, _saliency_pool_eager,
         _saliency_pool_bytes),
]

CASES_BY_NAME = {c.name: c for c in CASES}
