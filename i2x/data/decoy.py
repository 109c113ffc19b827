"""The decoy rule of Decoy-MNIST (Ross et al. 2017, "Right for the right reasons"), seeded.

Every image gets a ``DECOY_SIZE`` x ``DECOY_SIZE`` square in one of its four corners, drawn
uniformly. The square's grey level (on the 0-255 scale) is ``255 - DECOY_STEP * k`` for a class
``k``: at train ``k`` is the image's label, so the square alone predicts the class; at test ``k``
is drawn uniformly from all classes, so the square carries no information about the label.

This module knows only pixels: :func:`add_decoys` takes images scaled to [0, 1] (before any
normalisation) and their labels, and returns the images with their squares, the squares' masks
and the classes whose grey each square carries. ``i2x.data.load_dataset`` calls it for the
``decoy-*`` datasets (docs/tracking.md, "Decoy datasets").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from i2x._internal.checks import check_int, describe

__all__ = ["DECOY_SIZE", "DECOY_STEP", "CORNERS", "Decoys", "add_decoys", "decoy_generator", "decoy_grey"]

DECOY_SIZE = 4
# Grey levels 255, 230, ..., 30 for classes 0..9: ten levels that stay apart after a resize.
DECOY_STEP = 25
#: the corners by index, as :attr:`Decoys.corners` holds them
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
# torch.Generator.manual_seed takes seeds below 2**64; the train and test streams use 2 * seed (+ 1).
_MAX_SEED = 2**63 - 1


@dataclass(frozen=True, eq=False)
class Decoys:
    """What :func:`add_decoys` returns.

    images:  ``[N, C, H, W]`` float, the input with each image's square written in (a new tensor)
    masks:   ``[N, 1, H, W]`` bool, True exactly on each image's square
    classes: ``[N]`` int64, the class whose grey each square carries (the labels at train)
    corners: ``[N]`` int64 in 0..3, the corner of each square (index into :data:`CORNERS`)
    """

    images: torch.Tensor
    masks: torch.Tensor
    classes: torch.Tensor
    corners: torch.Tensor


def decoy_grey(classes: torch.Tensor) -> torch.Tensor:
    """``[N]`` class indices -> ``[N]`` float32 grey levels in [0, 1]: ``(255 - 25 k) / 255``,
    computed as a uint8 pixel is scaled (``float32(v) / 255``), so it equals a pixel of that value."""
    return (255 - DECOY_STEP * classes.to(torch.int64)).to(torch.float32) / 255.0


def decoy_generator(seed: int, train: bool) -> torch.Generator:
    """The random stream of one split: ``torch.Generator`` seeded with ``2 * seed`` (train) or
    ``2 * seed + 1`` (test), so the two splits never share a stream and no two seeds do either."""
    seed = check_int(seed, "decoy_seed", 0)
    if seed > _MAX_SEED:
        raise ValueError(f"decoy_seed: expected an int in [0, {_MAX_SEED}], got {seed}")
    return torch.Generator().manual_seed(2 * seed + (0 if train else 1))


def add_decoys(pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, *, train: bool,
               seed: int = 0) -> Decoys:
    """The decoy rule on ``pixels`` ``[N, C, H, W]`` (floating, scaled to [0, 1]) with ``labels`` ``[N]``.

    Draws, from :func:`decoy_generator`'s stream: first every image's corner (uniform over the
    four), then, at test only, every image's class (uniform over ``num_classes``). The same
    arguments give the same result; every channel of the square gets the same grey.
    """
    if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point() or pixels.dim() != 4:
        raise TypeError(f"pixels: expected a floating tensor [N, C, H, W], got {describe(pixels)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
        raise TypeError(f"labels: expected an int64 tensor [N], got {describe(labels)}")
    n, _, h, w = pixels.shape
    if labels.shape[0] != n:
        raise ValueError(f"labels: expected {n} labels (one per image), got {labels.shape[0]}")
    if h < DECOY_SIZE or w < DECOY_SIZE:
        raise ValueError(f"pixels: expected images of at least {DECOY_SIZE} x {DECOY_SIZE}, got {h} x {w}")
    num_classes = check_int(num_classes, "num_classes")
    # 255 - 25 * k must stay a grey level (>= 0): at most 11 classes.
    if num_classes > 255 // DECOY_STEP + 1:
        raise ValueError(f"num_classes: expected at most {255 // DECOY_STEP + 1} (one grey level each), "
                         f"got {num_classes}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels: expected values in [0, {num_classes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    gen = decoy_generator(seed, train)
    corners = torch.randint(0, len(CORNERS), (n,), generator=gen)
    classes = labels.clone() if train else torch.randint(0, num_classes, (n,), generator=gen)
    grey = decoy_grey(classes).to(pixels.dtype)
    images = pixels.clone()
    masks = torch.zeros(n, 1, h, w, dtype=torch.bool)
    for corner in range(len(CORNERS)):
        rows, cols = _square(corner, h, w)
        chosen = corners == corner
        images[chosen, :, rows, cols] = grey[chosen].view(-1, 1, 1, 1)
        masks[chosen, :, rows, cols] = True
    return Decoys(images, masks, classes, corners)


def _square(corner: int, h: int, w: int) -> tuple[slice, slice]:
    """The rows and columns of the square in ``corner`` of an ``h x w`` image."""
    top = 0 if corner < 2 else h - DECOY_SIZE
    left = 0 if corner % 2 == 0 else w - DECOY_SIZE
    return slice(top, top + DECOY_SIZE), slice(left, left + DECOY_SIZE)
