"""Planted shortcuts on real images: the positive controls of the closed loop.

A :class:`Mark` says what a shortcut looks like (a square, a bar, a ring, a dot pattern, a texture
patch, or a faint tint over the whole image), how large and bright it is, where it goes (one fixed
place, or one drawn per image from a set), and how often each class carries it in training (a
pair: e.g. 80% of one class and 5% of the other; or one class against the rest). In the training
set a model can then take the mark for its class; in the test set (:meth:`Mark.for_test`) every
class carries it equally often, so a model that relies on it loses accuracy there.
:meth:`Mark.plant` returns the marked copy and where the mark is (its pixels in each marked
image), so the loop's targets can be checked against the truth and an oracle arm can act on the
marks. :func:`draw_marks` draws marks of every kind from a seed, for suites that must not be
tuned to one mark. :func:`plant_mark` is the square of the first experiments, drawn as before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from i2x._internal.checks import check_int, check_number, describe
from i2x.data import ImageDataset

__all__ = ["PlantedMark", "Mark", "SHAPES", "OWN_SHARE", "plant_mark", "draw_marks"]

#: A prototype is a mark's own when it holds more than this share of the mark's cells and more than
#: this share of the images it appears in carry the mark (:meth:`PlantedMark.prototype_shares`).
OWN_SHARE = 0.5

#: The kinds of mark. ``tint`` adds ``intensity`` to every pixel (its mask is the whole image);
#: the others paint ``intensity`` into a ``size x size`` box.
SHAPES = ("square", "bar", "ring", "dots", "texture", "tint")


@dataclass
class PlantedMark:
    """A marked copy of a dataset and where the mark is.

    dataset: the marked ``ImageDataset``; marked ``[N]`` bool; indices ``[T]``: the marked
    positions; masks ``[T, H, W]`` bool: the mark's pixels in each marked image.
    """

    dataset: ImageDataset
    marked: torch.Tensor
    indices: torch.Tensor
    masks: torch.Tensor

    def pixel_masks(self) -> torch.Tensor:
        """``[N, H, W]`` bool over the whole dataset: the mark's pixels, all False where unmarked
        (the form :class:`i2x.loop.RRRPenalty` and :func:`i2x.wrong_reason_share` take)."""
        out = torch.zeros(len(self.marked), *self.masks.shape[1:], dtype=torch.bool)
        out[self.indices] = self.masks
        return out

    def prototype_shares(self, indices: torch.Tensor, assignment: torch.Tensor) -> dict[str, torch.Tensor]:
        """How a prototype assignment ``[N, h, w]`` over the images ``indices [N]`` of the dataset
        meets the mark, per prototype (``[K]`` each): ``holds``, the share of the mark's cells
        (cells whose box touches marked pixels) assigned to it; ``marked``, the share of the images
        it appears in that carry the mark; ``own`` (bool): both above :data:`OWN_SHARE`, one half:
        it takes most of the mark, and it appears mostly where the mark is. (The share of its
        own cells on the mark is no test: a layer's receptive field spreads a small mark over the
        neighbouring cells, so the mark's prototype also holds cells beside it.)"""
        if assignment.dim() != 3 or assignment.shape[0] != len(indices):
            raise ValueError(f"assignment: expected [len(indices), h, w] = [{len(indices)}, h, w], "
                             f"got {list(assignment.shape)}")
        k = int(assignment.max()) + 1
        masks = self.pixel_masks()[indices][:, None].float()
        on_mark = F.adaptive_max_pool2d(masks, tuple(assignment.shape[1:]))[:, 0] > 0
        marked = self.marked[indices]
        holds, in_marked = torch.zeros(k), torch.zeros(k)
        for j in range(k):
            cells = assignment == j
            holds[j] = float((on_mark & cells).sum()) / max(1, int(on_mark.sum()))
            present = cells.flatten(1).any(1)
            in_marked[j] = float(marked[present].float().mean()) if present.any() else 0.0
        return {"holds": holds, "marked": in_marked, "own": (holds > OWN_SHARE) & (in_marked > OWN_SHARE)}


@dataclass(frozen=True)
class Mark:
    """One planted shortcut.

    shape: one of :data:`SHAPES`. size: the box's side in pixels (not used by ``tint``).
    places: ``(top, left)`` corners of the box; one is a fixed place, several are drawn from per
    image (seeded). intensity: the pixel value painted, in [0, 1] before the dataset's
    normalisation (``tint``: the amount added to every pixel, clipped to [0, 1]).
    rates: ``(class, share)`` pairs: the share of each class's images that carry the mark.
    pattern_seed: the ``texture`` patch's random pattern.
    """

    shape: str = "square"
    size: int = 4
    places: tuple[tuple[int, int], ...] = ((1, 1),)
    intensity: float = 1.0
    rates: tuple[tuple[int, float], ...] = ()
    pattern_seed: int = 0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape: expected one of {list(SHAPES)}, got {self.shape!r}")
        check_int(self.size, "size", 1)
        if not self.places or not all(isinstance(p, tuple) and len(p) == 2 for p in self.places):
            raise ValueError(f"places: expected one or more (top, left) pairs, got {self.places!r}")
        check_number(self.intensity, "intensity", 0.0, 1.0)
        for c, rate in self.rates:
            check_int(c, "rates: class", 0)
            check_number(rate, f"rates[{c}]", 0.0, 1.0)

    # -- description ----------------------------------------------------------------------------

    @property
    def classes(self) -> list[int]:
        return [int(c) for c, _ in self.rates]

    def to_dict(self) -> dict:
        """JSON-ready fields (lists for tuples); :meth:`from_dict` reads them back."""
        d = asdict(self)
        d["places"] = [list(p) for p in self.places]
        d["rates"] = [[int(c), float(r)] for c, r in self.rates]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Mark:
        return cls(shape=d["shape"], size=int(d["size"]), places=tuple((int(p[0]), int(p[1])) for p in d["places"]),
                   intensity=float(d["intensity"]), rates=tuple((int(c), float(r)) for c, r in d["rates"]),
                   pattern_seed=int(d.get("pattern_seed", 0)))

    def describe(self, classes: list[str] | None = None) -> str:
        """One line: ``"ring 5 px at 2 places, intensity 0.8: Shirt 80%, T-shirt/top 5%"``; one class against
        the rest: ``"...: Bag 80%, the 9 other classes 5%"``."""
        names = (lambda c: classes[c]) if classes else str
        if self.shape == "tint":
            where = "the whole image"
        elif len(self.places) == 1:
            where = f"{self.size} px at {self.places[0]}"
        else:
            where = f"{self.size} px at {len(self.places)} places"
        shares = [r for _, r in self.rates]
        common = max(set(shares), key=shares.count)
        if len(self.rates) > 2 and shares.count(common) > 1:  # one class against the rest: the rest in one phrase
            rates = ", ".join([f"{names(c)} {100 * r:.0f}%" for c, r in self.rates if r != common]
                              + [f"the {shares.count(common)} other classes {100 * common:.0f}%"])
        else:
            rates = ", ".join(f"{names(c)} {100 * r:.0f}%" for c, r in self.rates)
        return f"{self.shape} {where}, intensity {self.intensity:g}: {rates}"

    def for_test(self, share: float = 0.5, classes: list[int] | None = None) -> Mark:
        """The same mark carried by ``share`` of every class in ``classes`` (default the mark's
        own classes): drawn independently of the class, as a test set needs."""
        which = self.classes if classes is None else [int(c) for c in classes]
        return replace(self, rates=tuple((c, float(share)) for c in which))

    # -- drawing --------------------------------------------------------------------------------

    def pattern(self) -> torch.Tensor:
        """``[size, size]`` bool: the pixels of the box the mark paints."""
        s = self.size
        r = torch.arange(s)
        if self.shape == "square" or self.shape == "texture":
            if self.shape == "texture":  # a fixed random half of the box, the same in every image
                g = torch.Generator().manual_seed(0x7E47 + int(self.pattern_seed))
                keep = torch.rand(s, s, generator=g) < 0.5
                keep.view(-1)[0] = True  # never empty
                return keep
            return torch.ones(s, s, dtype=torch.bool)
        if self.shape == "bar":  # a horizontal bar a third of the box high, centred
            thick = max(1, s // 3)
            out = torch.zeros(s, s, dtype=torch.bool)
            top = (s - thick) // 2
            out[top:top + thick] = True
            return out
        if self.shape == "ring":  # the box's outline
            out = torch.ones(s, s, dtype=torch.bool)
            if s > 2:
                out[1:-1, 1:-1] = False
            return out
        if self.shape == "dots":  # every other pixel, a checkerboard
            return (r[:, None] + r[None, :]) % 2 == 0
        raise ValueError(f"shape {self.shape!r} has no box pattern")

    def plant(self, dataset: ImageDataset, seed: int = 0) -> PlantedMark:
        """A marked copy of ``dataset`` (the input is not changed): a seeded random share of each
        class's images (``rates``) carries the mark. The choice of images does not depend on the
        mark's look, only on ``rates`` and ``seed``."""
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"dataset: expected an i2x.data.ImageDataset, got {describe(dataset)}")
        _, h, w = dataset.image_shape
        if self.shape != "tint":
            for top, left in self.places:
                if top < 0 or left < 0 or top + self.size > h or left + self.size > w:
                    raise ValueError(f"a {self.size} x {self.size} mark at {(top, left)} does not fit a {h} x {w} "
                                     "image")
        for c in self.classes:
            if c >= dataset.num_classes:
                raise ValueError(f"rates: class {c} is not one of the dataset's {dataset.num_classes} classes")
        marked = _choose(dataset.labels, dict(self.rates), seed)
        indices = marked.nonzero().flatten()
        masks = self._masks(indices.numel(), h, w, seed)
        images = dataset.images.clone()
        if indices.numel():
            images[indices] = self._paint(dataset, images[indices], masks)
        out = ImageDataset(images, dataset.labels.clone(), list(dataset.classes), dataset.name, dataset.split,
                           dataset.mean, dataset.std)
        return PlantedMark(out, marked, indices, masks)

    def _masks(self, n: int, h: int, w: int, seed: int) -> torch.Tensor:
        if self.shape == "tint":
            return torch.ones(n, h, w, dtype=torch.bool)
        pattern = self.pattern()
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        if len(self.places) == 1:
            where = torch.zeros(n, dtype=torch.int64)
        else:  # a stream apart from the choice of images, so the same images are marked either way
            g = torch.Generator().manual_seed(_stream(seed) + 0x91ACE)
            where = torch.randint(0, len(self.places), (n,), generator=g)
        for k, (top, left) in enumerate(self.places):
            rows = where == k
            masks[rows, top:top + self.size, left:left + self.size] = pattern
        return masks

    def _paint(self, dataset: ImageDataset, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        channels = images.shape[1]
        mean = torch.tensor(dataset.mean, dtype=images.dtype).view(1, channels, 1, 1)
        std = torch.tensor(dataset.std, dtype=images.dtype).view(1, channels, 1, 1)
        where = masks[:, None].expand_as(images)
        if self.shape == "tint":
            pixels = (images * std + mean + self.intensity).clamp(0.0, 1.0)
            return (pixels - mean) / std
        value = ((self.intensity - mean) / std).expand_as(images)
        return torch.where(where, value, images)


def _stream(seed: int) -> int:
    # A stream of its own: seeded plainly, the draw would repeat the permutation that
    # stratified_subset(seed) makes, and a probe drawn with the same seed would hold exactly the
    # marked samples of a sparsely marked class (seen here: all probe T-shirts marked, 5% overall).
    return int(seed) * 2_654_435_761 % (2 ** 61 - 1) + 0x5EED


def _choose(labels: torch.Tensor, rates: dict[int, float], seed: int) -> torch.Tensor:
    """``[N]`` bool: a seeded random ``rates[c]`` share of class c's samples, class by class."""
    g = torch.Generator().manual_seed(_stream(seed))
    marked = torch.zeros(labels.numel(), dtype=torch.bool)
    for c, rate in sorted(rates.items()):
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"rates[{c}]: expected a share in [0, 1], got {rate!r}")
        idx = (labels == int(c)).nonzero().flatten()
        chosen = idx[torch.randperm(idx.numel(), generator=g)[: int(round(float(rate) * idx.numel()))]]
        marked[chosen] = True
    return marked


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
    for c, rate in rates.items():
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"rates[{c}]: expected a share in [0, 1], got {rate!r}")
    mark = Mark("square", int(size), ((top, left),), float(value), tuple(sorted((int(c), float(r))
                                                                                for c, r in rates.items())))
    return mark.plant(dataset, seed=seed)


def draw_marks(n: int, seed: int, image_hw: tuple[int, int], num_classes: int) -> list[Mark]:
    """``n`` marks drawn from ``seed``, covering every kind: the shapes in turn (so 12 marks hold
    each twice), then per mark a size of 3-6 px, one fixed place or four per-image places, an
    intensity (0.6-1.0; a tint 0.04-0.12), and classes: a pair (one class 60-95%, the other 0-10%)
    or one class against the rest (60-95% of it, 0-10% of every other)."""
    check_int(n, "n", 1)
    check_int(num_classes, "num_classes", 2)
    h, w = (int(v) for v in image_hw)
    g = torch.Generator().manual_seed(0xA11CE + int(seed))

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    marks = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        size = int(pick([3, 4, 5, 6]))
        size = min(size, h, w)
        n_places = 1 if float(torch.rand(1, generator=g)) < 0.5 else 4
        places = tuple((int(torch.randint(0, h - size + 1, (1,), generator=g)),
                        int(torch.randint(0, w - size + 1, (1,), generator=g))) for _ in range(n_places))
        intensity = float(pick([0.04, 0.08, 0.12])) if shape == "tint" else float(pick([0.6, 0.8, 1.0]))
        high = float(pick([0.6, 0.8, 0.95]))
        low = float(pick([0.0, 0.05, 0.1]))
        main = int(torch.randint(0, num_classes, (1,), generator=g))
        pairs: list[tuple[int, float]]
        if float(torch.rand(1, generator=g)) < 0.5:  # a pair
            other = (main + 1 + int(torch.randint(0, num_classes - 1, (1,), generator=g))) % num_classes
            pairs = [(main, high), (other, low)]
        else:  # one class against the rest
            pairs = [(c, high if c == main else low) for c in range(num_classes)]
        rates = tuple(sorted(pairs))
        marks.append(Mark(shape, size, places, intensity, rates, pattern_seed=int(seed) * 100 + i))
    return marks
