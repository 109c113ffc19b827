"""The strategies' data objects: ordinary torch ``Dataset`` / ``Subset`` / ``Sampler`` classes that
any training loop can take, and the epoch order every arm of an experiment shares.

``Targets`` (``i2x.loop.targets``) builds them: ``targets.perturbed(train)`` is a :class:`PerturbedDataset`,
``targets.transplanted(train)`` a :class:`TransplantedDataset`, ``targets.sampler(train)`` an
:class:`OversampleSampler`, ``targets.subset(train)`` a ``Subset``. Each also reads a batch of
positions in one indexing operation (``i2x_batch``), which ``i2x.data.batch_of`` and
``i2x.finetune`` use.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler, Subset

from i2x._internal.checks import check_int
from i2x.data import batch_of

__all__ = ["PERTURB_MODES", "mass_share", "top_share", "pixel_masks", "epoch_permutation", "PerturbedDataset",
           "TransplantedDataset", "OversampleSampler", "transplant_rows"]

PERTURB_MODES = ("fill", "blur", "noise")


# ----------------------------------------------------------------------------------------------
# Where on the grid: the share of a map's mass on some cells, and cells as pixels


def mass_share(cam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, h, w]`` maps and masks -> ``[B]``: the share of each map's mass on the masked cells
    (0 where a map is all zero)."""
    total = cam.flatten(1).sum(1)
    on = (cam * mask).flatten(1).sum(1)
    return torch.where(total > 0, on / total.clamp(min=torch.finfo(cam.dtype).tiny), torch.zeros_like(total))


def top_share(cam: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """``[B]``: the share of each map's top-``q`` positions (at least one) that are masked."""
    flat = cam.flatten(1)
    n = max(1, int(math.ceil(q * flat.shape[1])))
    top = flat.topk(n, dim=1).indices
    return mask.flatten(1).gather(1, top).float().mean(1)


def pixel_masks(cell_masks: torch.Tensor, image_hw: tuple[int, int], dilate: int = 0) -> torch.Tensor:
    """Cell masks ``[B, h, w]`` upsampled to pixels ``[B, H, W]`` (nearest), grown by ``dilate``
    pixels on every side (a feature cell sees a little beyond its own pixels)."""
    m = F.interpolate(cell_masks[:, None].float(), size=tuple(image_hw), mode="nearest")
    if dilate > 0:
        m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    return m[:, 0] > 0


# ----------------------------------------------------------------------------------------------
# The data objects


class _Batched:
    """``i2x_batch(positions) -> (images [B, ...], labels [B])`` is the one-operation batch read
    (``batch_of`` uses it); ``__getitems__`` serves torch's ``DataLoader`` the same rows as a
    list of samples, which its collate stacks."""

    def __getitems__(self, positions):
        x, y = self.i2x_batch(torch.as_tensor(positions, dtype=torch.int64))
        return list(zip(x, y, strict=True))


class BatchedSubset(_Batched, Subset):
    """A ``Subset`` that also reads a batch of positions in one indexing operation."""

    def __init__(self, dataset, indices: torch.Tensor):
        self.index_tensor = torch.as_tensor(indices, dtype=torch.int64)
        super().__init__(dataset, self.index_tensor.tolist())

    def i2x_batch(self, positions):
        return batch_of(self.dataset, self.index_tensor[torch.as_tensor(positions, dtype=torch.int64)])


class _ReplacedImages(_Batched, Dataset):
    """A dataset with the images at some positions replaced by precomputed ones."""

    def __init__(self, dataset, indices: torch.Tensor, images: torch.Tensor):
        self.dataset = dataset
        self.replaced = torch.full((len(dataset),), -1, dtype=torch.int64)
        self.replaced[indices] = torch.arange(indices.numel())
        self.images = images

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        i = int(i)
        image, label = self.dataset[i]
        j = int(self.replaced[i])
        return (self.images[j] if j >= 0 else image), label

    def i2x_batch(self, positions):
        positions = torch.as_tensor(positions, dtype=torch.int64)
        x, y = batch_of(self.dataset, positions)
        j = self.replaced[positions]
        hit = j >= 0
        if bool(hit.any()):
            x = x.clone()
            x[hit] = self.images[j[hit]].to(x.dtype)
        return x, y

    @property
    def changed_indices(self) -> torch.Tensor:
        """Dataset positions whose image differs from the original's."""
        return (self.replaced >= 0).nonzero().flatten()


def _ring_stats(images: torch.Tensor, masks: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, the mean and std of the pixels in a ring of ``width`` px around the
    mask (the whole unmasked image where the ring is empty)."""
    m = masks[:, None].float()
    ring = (F.max_pool2d(m, 2 * width + 1, stride=1, padding=width) - m).clamp(min=0)
    ring = ring.expand_as(images)
    empty = ring.flatten(2).sum(2) == 0
    outside = (1 - m).expand_as(images)
    ring = torch.where(empty[..., None, None], outside, ring)
    w = ring.flatten(2).sum(2).clamp(min=1)
    mean = (images * ring).flatten(2).sum(2) / w
    var = (((images - mean[..., None, None]) ** 2) * ring).flatten(2).sum(2) / w
    return mean, var.sqrt()


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class PerturbedDataset(_ReplacedImages):
    """Every sample of ``dataset``; at ``indices`` the pixels under ``masks [T, H, W]`` replaced.

    ``fill``: the mean of the image's own pixels in a ring around the region, per channel (a
    dataset-wide per-pixel mean would itself be a pattern: a grey mark where the background is
    black); ``noise``: that mean plus Gaussian noise of the ring's spread (seeded); ``blur``: a
    Gaussian blur of the whole image (sigma = a quarter of the image's shorter side) in the region.
    """

    def __init__(self, dataset, indices: torch.Tensor, masks: torch.Tensor, mode: str = "fill", seed: int = 0):
        if mode not in PERTURB_MODES:
            raise ValueError(f"mode: expected one of {list(PERTURB_MODES)}, got {mode!r}")
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if masks.shape[0] != indices.numel():
            raise ValueError(f"masks: expected {indices.numel()} masks, got {masks.shape[0]}")
        x, _ = batch_of(dataset, indices) if indices.numel() else (torch.zeros(0), None)
        if indices.numel():
            if tuple(masks.shape[1:]) != tuple(x.shape[-2:]):
                raise ValueError(f"masks: expected [T, {x.shape[-2]}, {x.shape[-1]}], got {list(masks.shape)}")
            m = masks[:, None].expand_as(x)
            width = max(2, int(math.ceil(max(x.shape[-2:]) / 14)))
            if mode == "blur":
                fill = _gaussian_blur(x, max(x.shape[-2:]) / 4)
            else:
                mean, std = _ring_stats(x, masks, width)
                fill = mean[..., None, None].expand_as(x)
                if mode == "noise":
                    g = torch.Generator().manual_seed(int(seed))
                    fill = fill + std[..., None, None] * torch.randn(x.shape, generator=g, dtype=x.dtype)
            x = torch.where(m, fill, x)
        super().__init__(dataset, indices, x)
        self.mode = mode
        self.masks = masks


class TransplantedDataset(_ReplacedImages):
    """Every sample of ``dataset``; recipient ``recipients[i]`` gets the pixels of
    ``donors[i]`` under ``masks[i]`` (same place), everything else unchanged."""

    def __init__(self, dataset, donors: torch.Tensor, recipients: torch.Tensor, masks: torch.Tensor):
        donors = torch.as_tensor(donors, dtype=torch.int64)
        recipients = torch.as_tensor(recipients, dtype=torch.int64)
        if donors.shape != recipients.shape or masks.shape[0] != donors.numel():
            raise ValueError("donors, recipients and masks must have one entry each per transplant")
        if recipients.unique().numel() != recipients.numel():
            raise ValueError("recipients: each sample can receive one transplant")
        xd, _ = batch_of(dataset, donors)
        xr, _ = batch_of(dataset, recipients)
        m = masks[:, None].expand_as(xr)
        super().__init__(dataset, recipients, torch.where(m, xd, xr))
        self.donors = donors
        self.recipients = recipients
        self.masks = masks


def transplant_rows(labels: torch.Tensor, selected: torch.Tensor, classes, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Who pastes into whom: ``(donor rows, recipient rows)`` over rows with ``labels [R]`` and
    ``selected [R]`` (the targets). For each class c of ``classes`` in turn, its targets donate to
    non-target rows of the *other* classes not yet used (seeded draw; each recipient takes one;
    with more donors than recipients a seeded subset of the donors). With the two classes of a
    pair this is the pair transplant; with every class the cue is spread over all the others."""
    used = torch.zeros_like(selected)
    donors, recipients = [], []
    for c in classes:
        d_rows = (selected & (labels == c)).nonzero().flatten()
        pool = ((~selected) & (labels != c) & (~used) & torch.isin(labels, torch.as_tensor(list(classes)))
                ).nonzero().flatten()
        if d_rows.numel() == 0 or pool.numel() == 0:
            continue
        pool = pool[torch.randperm(pool.numel(), generator=generator)]
        if d_rows.numel() > pool.numel():  # more donors than recipients: each recipient takes one
            d_rows = d_rows[torch.randperm(d_rows.numel(), generator=generator)[:pool.numel()]]
        donors.append(d_rows)
        recipients.append(pool[:d_rows.numel()])
        used[recipients[-1]] = True
    if not donors:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    return torch.cat(donors), torch.cat(recipients)


def epoch_permutation(n: int, seed: int, epoch: int = 0) -> torch.Tensor:
    """The seeded order of ``n`` positions in epoch ``epoch``: every arm of an experiment draws its
    data order from here, so within a seed they see the samples they share in the same order."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(int(n), generator=g)


class OversampleSampler(Sampler[int]):
    """Each of ``n`` positions once per epoch, in the order of :func:`epoch_permutation` (the order
    an un-oversampled arm of the same seed sees), plus ``extra`` draws from ``pool`` inserted at
    random places (without replacement while the pool lasts, unless ``replacement``).
    ``len = n + extra``. Call :meth:`set_epoch` between epochs, as with ``DistributedSampler``."""

    def __init__(self, n: int, pool: torch.Tensor, extra: int, seed: int = 0, replacement: bool = False):
        pool = torch.as_tensor(pool, dtype=torch.int64)
        extra = check_int(extra, "extra", 0)
        if extra > 0 and pool.numel() == 0:
            raise ValueError("pool: no samples to oversample")
        self.n, self.pool, self.extra, self.replacement = int(n), pool, int(extra), bool(replacement)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n + self.extra

    def order(self) -> torch.Tensor:
        """This epoch's ``[n + extra]`` positions."""
        base = epoch_permutation(self.n, self.seed, self.epoch)
        if self.extra == 0:
            return base
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_919)
        if self.replacement:
            extra = self.pool[torch.randint(self.pool.numel(), (self.extra,), generator=g)]
        else:
            reps = -(-self.extra // self.pool.numel())
            rounds = [self.pool[torch.randperm(self.pool.numel(), generator=g)] for _ in range(reps)]
            extra = torch.cat(rounds)[:self.extra]
        total = self.n + self.extra
        slots = torch.zeros(total, dtype=torch.bool)
        slots[torch.randperm(total, generator=g)[:self.extra]] = True
        out = torch.empty(total, dtype=torch.int64)
        out[slots] = extra
        out[~slots] = base  # the shared base order, with the extra draws slotted in
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())
