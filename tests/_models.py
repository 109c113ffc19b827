"""Tiny models for the explainer tests (fast on a CPU, deterministic given a seed)."""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 5


class TinyCNN(nn.Module):
    """conv-BN-ReLU, conv (stride 2) - ReLU, conv (stride 2) - ReLU, global pool, linear.

    For a 32 x 32 input: ``features.3`` (a conv followed by a ReLU) gives a 16 x 16 grid,
    ``features.5`` an 8 x 8 grid. A conv after ``features.3`` makes its gradients vary over
    space (with only a pool + linear head every position would get the same gradient).
    ``inplace=True`` makes every ReLU in-place, so the ReLU right after ``features.3`` overwrites
    that conv's output.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, inplace: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),  # 0
            nn.BatchNorm2d(8),  # 1
            nn.ReLU(inplace=inplace),  # 2
            nn.Conv2d(8, 16, 3, stride=2, padding=1),  # 3
            nn.ReLU(inplace=inplace),  # 4
            nn.Conv2d(16, 16, 3, stride=2, padding=1),  # 5
            nn.ReLU(inplace=inplace),  # 6
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny_cnn(seed: int = 1, inplace: bool = False, num_classes: int = NUM_CLASSES) -> TinyCNN:
    """A TinyCNN with weights drawn from ``seed`` (the same weights for inplace True / False) and
    BatchNorm running statistics that are not the identity, so eval mode differs from train mode."""
    gen = torch.Generator().manual_seed(seed)
    model = TinyCNN(num_classes=num_classes, inplace=inplace)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).float() * 0.5)
        bn = model.features[1]
        bn.running_mean.copy_(torch.randn(8, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
    return model


def tiny_input(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    """``[batch, 3, size, size]`` noise with a different colour cast per image, so that the
    default ``tiny_cnn`` does not predict one class for every image (eval mode: [0, 0, 3])."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    for b in range(batch):
        x[b, b % 3] += 2.0
    return x


class RaisesAfter(nn.Module):
    """Runs ``inner.features`` and then raises: an error inside the forward after the layer."""

    def __init__(self, inner: TinyCNN):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        self.inner.features(x)
        raise RuntimeError("boom after the layer")


class TwoHeads(nn.Module):
    """A module that runs twice per forward (``shared``), one that never runs (``unused``) and one
    that returns a tuple (``pair``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.unused = nn.Conv2d(4, 4, 1)
        self.pair = _Pair()
        self.fc = nn.Linear(4, NUM_CLASSES)

    def forward(self, x):
        h = self.shared(self.shared(self.stem(x)))
        h, _ = self.pair(h)
        return self.fc(h.mean(dim=(2, 3)))


class _Pair(nn.Module):
    def forward(self, h):
        return h, h.sum()


class FlatOnly(nn.Module):
    """No submodule returns a 4-D output: layer=None cannot find a layer."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 8)
        self.fc2 = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))
