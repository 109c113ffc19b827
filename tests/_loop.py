"""Small builders shared by the closed-loop tests (test_curate, test_finetune, test_experiment).

Everything here is seeded and tiny (8 x 8 images, a few hundred samples, models of a few hundred
parameters), so a test that trains runs in a second or two on a shared 2-core CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from i2x.loop import Targets
from i2x.data import ImageDataset

H = W = 8
GRID = (4, 4)  # cells of 2 x 2 pixels


def image_dataset(n: int = 40, classes: int = 3, seed: int = 0, channels: int = 1, size: int = H,
                  split: str = "train", signal: float = 0.0) -> ImageDataset:
    """``n`` images of Gaussian noise, labels ``0, 1, ..., classes-1`` repeated then shuffled.

    ``signal`` > 0 adds a class-dependent pattern a conv net with global pooling can learn:
    class 0 brighter, class 1 darker, class 2 a checkerboard (others: finer stripes)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, channels, size, size, generator=g)
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=g)]
    if signal:
        r = torch.arange(size)
        checker = ((r[:, None] + r[None, :]) % 2 * 2 - 1).float()
        for c in range(classes):
            if c < 2:
                pattern = torch.full((size, size), 1.0 - 2 * c)
            elif c == 2:
                pattern = checker
            else:
                pattern = ((r[None, :] // (c - 2)) % 2 * 2 - 1).float().expand(size, size)
            images[labels == c] += signal * pattern
    return ImageDataset(images, labels.long(), [f"c{k}" for k in range(classes)], "custom", split)


def hand_targets(dataset, pair=(0, 1), seed: int = 0, n_targets=(3, 4), grid=GRID) -> Targets:
    """A :class:`Targets` built by hand for ``dataset``: every sample of the pair is a row (in
    dataset order); ``n_targets[i]`` samples of ``pair[i]`` are selected; every row has a random,
    non-empty cell mask; margins are distinct random values (so the lowest ones are unambiguous)."""
    g = torch.Generator().manual_seed(seed)
    a, b = pair
    labels = dataset.labels
    rows = ((labels == a) | (labels == b)).nonzero().flatten()
    y = labels[rows].clone()
    selected = torch.zeros(rows.numel(), dtype=torch.bool)
    for c, k in zip(pair, n_targets):
        in_c = (y == c).nonzero().flatten()
        selected[in_c[torch.randperm(in_c.numel(), generator=g)[:k]]] = True
    cells = torch.rand(rows.numel(), *grid, generator=g) < 0.25
    cells[:, 0, 0] |= ~cells.flatten(1).any(1)  # never an empty mask
    rivals = torch.where(y == a, torch.full_like(y, b), torch.full_like(y, a))
    scores = torch.rand(rows.numel(), generator=g)
    margins = torch.randperm(rows.numel(), generator=g).float() - rows.numel() / 2
    preds = torch.where(margins < 0, rivals, y)
    return Targets((a, b), [{"prototype": 0, "kind": "decisive", "score": 1.0, "reason": "by hand"}], rows, y,
                   rivals, scores, scores.clone(), margins, preds, cells, selected, {"rule": "by hand"},
                   tuple(dataset.images.shape[-2:]), list(dataset.classes))


def hand_model_targets(dataset, seed: int = 0, per_class: int = 6, grid=GRID) -> Targets:
    """Model-scope :class:`Targets` by hand: every sample is a row, ``per_class`` of each class are
    selected, each row's rival is a random other class, masks as in :func:`hand_targets`."""
    g = torch.Generator().manual_seed(seed)
    labels = dataset.labels
    n, m = labels.numel(), len(dataset.classes)
    rows = torch.arange(n)
    selected = torch.zeros(n, dtype=torch.bool)
    for c in range(m):
        in_c = (labels == c).nonzero().flatten()
        selected[in_c[torch.randperm(in_c.numel(), generator=g)[:per_class]]] = True
    cells = torch.rand(n, *grid, generator=g) < 0.25
    cells[:, 0, 0] |= ~cells.flatten(1).any(1)
    rivals = (labels + torch.randint(1, m, (n,), generator=g)) % m
    scores = torch.rand(n, generator=g)
    margins = torch.randperm(n, generator=g).float() - n / 2
    preds = torch.where(margins < 0, rivals, labels)
    return Targets(None, [{"prototype": 0, "kind": "decisive", "score": 1.0, "reason": "by hand"}], rows,
                   labels.clone(), rivals, scores, scores.clone(), margins, preds, cells, selected,
                   {"rule": "by hand"}, tuple(dataset.images.shape[-2:]), list(dataset.classes), scope="model")


class TinyNet(nn.Module):
    """conv - BN - ReLU - conv (``layer``) - ReLU - global pool - linear; ``bn=False`` drops the BN."""

    def __init__(self, classes: int = 3, channels: int = 1, width: int = 4, bn: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width) if bn else nn.Identity()
        self.layer = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.layer(torch.relu(self.bn(self.conv(x)))))
        return self.fc(h.mean(dim=(2, 3)))


def tiny_net(seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


def state_equal(a: dict, b: dict) -> bool:
    """Bit-identical state dicts (same keys, dtypes, shapes and bytes)."""
    if a.keys() != b.keys():
        return False
    return all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
