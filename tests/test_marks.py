"""Planted marks of any shape (i2x.planted: Mark, draw_marks, plant_mark) against hand-made truths.

Truths: the pixels each shape should paint, written out by hand; the counts of marked images per
class from the rates; a plain re-implementation of the first square mark (the draw the published
experiments used must not change); and the dataset's own normalisation for the painted values.
"""

from __future__ import annotations

import pytest
import torch

import i2x
from i2x.data import ImageDataset
from i2x.loop.planted import SHAPES, Mark, draw_marks, plant_mark

H = W = 12
MEAN, STD = (0.3,), (0.2,)


def dataset(n: int = 200, classes: int = 4, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 1, H, W, generator=g) * 0.5  # room above for a tint
    labels = torch.arange(n) % classes
    return ImageDataset((pixels - MEAN[0]) / STD[0], labels, [f"c{k}" for k in range(classes)], "custom", "train",
                        MEAN, STD)


def pixels(ds: ImageDataset) -> torch.Tensor:
    return ds.images * STD[0] + MEAN[0]


def test_each_shape_paints_exactly_its_pixels():
    """The painted pixels are the mask's, at the mark's intensity, and nothing else changes."""
    by_hand = {
        "square": torch.ones(4, 4, dtype=torch.bool),
        "bar": torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool),
        "ring": torch.tensor([[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool),
        "dots": torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool),
    }
    data = dataset()
    for shape in SHAPES:
        mark = Mark(shape, 4, ((2, 5),), 0.9, ((1, 0.5),), pattern_seed=3)
        planted = mark.plant(data, seed=0)
        assert planted.indices.numel() == 25  # half of class 1's 50 images
        before, after = pixels(data)[planted.indices, 0], pixels(planted.dataset)[planted.indices, 0]
        if shape == "tint":
            assert planted.masks.all()
            torch.testing.assert_close(after, (before + 0.9).clamp(0, 1))
            continue
        box = torch.zeros(H, W, dtype=torch.bool)
        box[2:6, 5:9] = by_hand.get(shape, mark.pattern())
        assert torch.equal(planted.masks, box.expand_as(planted.masks))
        torch.testing.assert_close(after[:, box], torch.full_like(after[:, box], 0.9))
        assert torch.equal(after[:, ~box], before[:, ~box])
        unmarked = ~planted.marked
        assert torch.equal(planted.dataset.images[unmarked], data.images[unmarked])
    texture = Mark("texture", 5, pattern_seed=1).pattern()
    assert texture.any() and not texture.all() and torch.equal(texture, Mark("texture", 5, pattern_seed=1).pattern())
    assert not torch.equal(texture, Mark("texture", 5, pattern_seed=2).pattern())


def test_rates_set_how_many_images_of_each_class_carry_it():
    data = dataset(n=400)  # 100 per class
    mark = Mark("ring", 3, ((0, 0),), 1.0, ((0, 0.8), (1, 0.05), (3, 0.0)))
    planted = mark.plant(data, seed=4)
    per_class = [int((planted.marked & (data.labels == c)).sum()) for c in range(4)]
    assert per_class == [80, 5, 0, 0]
    full = planted.pixel_masks()
    assert full.shape == (400, H, W) and torch.equal(full.flatten(1).any(1), planted.marked)
    test = mark.for_test(0.5).plant(data, seed=5)
    assert [int((test.marked & (data.labels == c)).sum()) for c in range(4)] == [50, 50, 0, 50]
    assert mark.for_test(0.3, classes=[0, 1, 2, 3]).rates == ((0, 0.3), (1, 0.3), (2, 0.3), (3, 0.3))


def test_per_image_places_use_every_place_and_do_not_change_which_images_are_marked():
    data = dataset(n=400)
    places = ((0, 0), (0, 8), (8, 0), (8, 8))
    moving = Mark("square", 4, places, 1.0, ((2, 1.0),)).plant(data, seed=1)
    fixed = Mark("square", 4, ((0, 0),), 1.0, ((2, 1.0),)).plant(data, seed=1)
    assert torch.equal(moving.indices, fixed.indices)
    seen = set()
    for m in moving.masks:
        rows, cols = m.nonzero(as_tuple=True)
        corner = (int(rows.min()), int(cols.min()))
        assert corner in places and int(m.sum()) == 16
        seen.add(corner)
    assert seen == set(places)
    again = Mark("square", 4, places, 1.0, ((2, 1.0),)).plant(data, seed=1)
    assert torch.equal(again.masks, moving.masks)  # seeded


def _first_square(dataset, rates, size=4, offset=(1, 1), value=1.0, seed=0):
    """The square the first experiments drew, written out plainly (the reference plant_mark must match)."""
    g = torch.Generator().manual_seed(int(seed) * 2_654_435_761 % (2 ** 61 - 1) + 0x5EED)
    marked = torch.zeros(len(dataset), dtype=torch.bool)
    for c, rate in sorted(rates.items()):
        idx = (dataset.labels == c).nonzero().flatten()
        marked[idx[torch.randperm(idx.numel(), generator=g)[: int(round(rate * idx.numel()))]]] = True
    images = dataset.images.clone()
    top, left = offset
    images[marked, :, top:top + size, left:left + size] = (value - dataset.mean[0]) / dataset.std[0]
    return images, marked


@pytest.mark.parametrize("rates,seed", [({1: 0.8, 0: 0.05}, 0), ({2: 0.5, 3: 0.5}, 1), ({0: 1.0}, 7)])
def test_plant_mark_draws_what_it_always_drew(rates, seed):
    data = dataset()
    planted = plant_mark(data, rates, seed=seed)
    images, marked = _first_square(data, rates, seed=seed)
    assert torch.equal(planted.marked, marked)
    torch.testing.assert_close(planted.dataset.images, images, rtol=0, atol=1e-6)
    assert torch.equal(planted.indices, marked.nonzero().flatten())


def test_draw_marks_covers_every_kind_from_a_seed():
    marks = draw_marks(12, seed=0, image_hw=(28, 28), num_classes=10)
    assert [m.shape for m in marks] == list(SHAPES) * 2
    assert draw_marks(12, seed=0, image_hw=(28, 28), num_classes=10) == marks
    assert draw_marks(12, seed=1, image_hw=(28, 28), num_classes=10) != marks
    kinds = {len(m.rates) for m in marks}
    assert kinds == {2, 10}, kinds  # pairs and one-against-the-rest both drawn
    assert {len(m.places) for m in marks} == {1, 4}
    data = ImageDataset(torch.zeros(40, 1, 28, 28), torch.arange(40) % 10, [str(k) for k in range(10)], "custom",
                        "train", (0.5,), (0.5,))
    for m in marks:
        m.plant(data, seed=0)  # every drawn mark fits the images
        assert Mark.from_dict(m.to_dict()) == m
        assert m.describe([str(k) for k in range(10)]).startswith(m.shape)


def test_describe_names_a_pair_in_full_and_the_rest_in_one_phrase():
    names = [f"c{k}" for k in range(10)]
    pair = Mark("ring", 5, ((2, 3), (4, 5)), 0.8, ((6, 0.8), (0, 0.05)))
    assert pair.describe(names) == "ring 5 px at 2 places, intensity 0.8: c6 80%, c0 5%"
    rest = Mark("bar", 4, ((7, 7),), 1.0, tuple((c, 0.6 if c == 9 else 0.0) for c in range(10)))
    assert rest.describe(names) == "bar 4 px at (7, 7), intensity 1: c9 60%, the 9 other classes 0%"
    assert Mark("tint", 3, ((0, 0),), 0.08, ((1, 0.9), (2, 0.9))).describe(names) == \
        "tint the whole image, intensity 0.08: c1 90%, c2 90%"  # two classes: both named, even at one rate


def test_bad_marks_are_refused_naming_the_field():
    data = dataset()
    with pytest.raises(ValueError, match="shape: expected one of"):
        Mark("star")
    with pytest.raises(ValueError, match=r"does not fit a 12 x 12 image"):
        Mark("square", 4, ((10, 0),), 1.0, ((0, 0.5),)).plant(data)
    with pytest.raises(ValueError, match="rates: class 7 is not one of the dataset's 4 classes"):
        Mark("square", 4, ((0, 0),), 1.0, ((7, 0.5),)).plant(data)
    with pytest.raises(ValueError, match=r"intensity: expected a number in \[0, 1\]"):
        Mark(intensity=1.5)
    with pytest.raises(ValueError, match=r"rates\[0\]: expected a number in \[0, 1\]"):
        Mark(rates=((0, 2.0),))
    with pytest.raises(TypeError, match="dataset: expected an i2x.data.ImageDataset"):
        Mark(rates=((0, 0.5),)).plant(torch.zeros(3, 1, 12, 12))
    with pytest.raises(ValueError, match="places"):
        Mark(places=())
    assert i2x.planted.Mark is Mark  # the documented home
