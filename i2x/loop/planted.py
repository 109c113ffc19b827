"""A planted shortcut on real images: the positive control of the closed loop.

:func:`plant_mark` draws a small bright square into chosen shares of two classes' images. In the
training set most images of one class carry it and few of the other, so a model can take the mark
for the class; in the test set it is drawn independently of the class, so a model that relies on
it confuses the pair. Where it was drawn is returned, so the loop's targets can be checked against
the truth and an oracle arm can act on exactly the marks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from i2x.data import ImageDataset

__all__ = ["PlantedMark", "plant_mark"]


@dataclass
class PlantedMark:
    """A marked copy of a dataset and where the mark is.

    dataset: the marked ``ImageDataset``; marked ``[N]`` bool; indices ``[T]``: the marked
    positions; masks ``[T, H, W]`` bool: the mark's pixels in each (the same square for all).
    """

    dataset: ImageDataset
    marked: torch.Tensor
    indices: torch.Tensor
    masks: torch.Tensor


def plant_mark(dataset: ImageDataset, rates: dict[int, float], size: int = 4, offset: tuple[int, int] = (1, 1),
               value: float = 1.0, seed: int = 0) -> PlantedMark:
    """Draw a ``size x size`` square of pixel value ``value`` (in [0, 1], before the dataset's
    normalisation) at ``offset`` (top, left) into a seeded random share ``rates[c]`` of class c's
    images; other classes are left alone. Returns a :class:`PlantedMark` (the input is not changed).
    """
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset: expected an i2x.data.ImageDataset, got {type(dataset).__name__}")
    _, h, w = dataset.image_shape
    top, left = (int(v) for v in offset)
    if size < 1 or top < 0 or left < 0 or top + size > h or left + size > w:
        raise ValueError(f"a {size} x {size} mark at {offset} does not fit a {h} x {w} image")
    # A stream of its own: seeded plainly, the draw would repeat the permutation that
    # stratified_subset(seed) makes, and a probe drawn with the same seed would hold exactly the
    # marked samples of a sparsely marked class (seen here: all probe T-shirts marked, 5% overall).
    g = torch.Generator().manual_seed(int(seed) * 2_654_435_761 % (2 ** 61 - 1) + 0x5EED)
    marked = torch.zeros(len(dataset), dtype=torch.bool)
    for c, rate in sorted(rates.items()):
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"rates[{c}]: expected a share in [0, 1], got {rate!r}")
        idx = (dataset.labels == int(c)).nonzero().flatten()
        chosen = idx[torch.randperm(idx.numel(), generator=g)[: int(round(float(rate) * idx.numel()))]]
        marked[chosen] = True
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top:top + size, left:left + size] = True
    images = dataset.images.clone()
    channels = dataset.images.shape[1]
    normalised = torch.tensor([(float(value) - dataset.mean[ch]) / dataset.std[ch] for ch in range(channels)],
                              dtype=images.dtype)
    indices = marked.nonzero().flatten()
    if indices.numel():
        patch = images[indices]
        patch[:, :, mask] = normalised[None, :, None].expand(indices.numel(), channels, int(mask.sum()))
        images[indices] = patch
    out = ImageDataset(images, dataset.labels.clone(), list(dataset.classes), dataset.name, dataset.split,
                       dataset.mean, dataset.std)
    return PlantedMark(out, marked, indices, mask.expand(indices.numel(), h, w).clone())
