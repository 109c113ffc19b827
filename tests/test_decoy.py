"""Tests for the decoy datasets (i2x.data.decoy, ``load_dataset("decoy-...")``, ImageDataset.masks)
and the wrong-reason metric (i2x.explain.metrics.relevance_mass, wrong_reason_share).

Truths: the published rule written out here by hand (the four 4 x 4 corner squares, grey
``255 - 25 k`` as a uint8 pixel scaled by 255), IDX files written byte by byte with ``struct``
(independent of the reader), Fashion-MNIST's own files where they are installed, shares worked out
by hand, and tiny models whose GradCAM can only see one region of the image.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import i2x
from i2x.data import DATASET_INFO, ImageDataset, load_dataset, load_recorded_dataset
from i2x.data.decoy import add_decoys
from i2x.explain.metrics import relevance_mass, wrong_reason_share
from i2x.track import Probe

REAL_FASHION = i2x.data.DEBIAN_FASHION_MNIST_DIR
H = W = 28


def corner_masks(h: int = H, w: int = W) -> torch.Tensor:
    """``[4, h, w]`` bool: the published squares, rows 0-3 or h-4..h-1, columns 0-3 or w-4..w-1."""
    out = torch.zeros(4, h, w, dtype=torch.bool)
    for k, (top, left) in enumerate([(0, 0), (0, w - 4), (h - 4, 0), (h - 4, w - 4)]):
        out[k, top:top + 4, left:left + 4] = True
    return out


def grey(k) -> torch.Tensor:
    """The square's pixel for class ``k``: the uint8 value 255 - 25 k, scaled as the loader scales pixels."""
    return torch.as_tensor(255 - 25 * np.asarray(k), dtype=torch.uint8).to(torch.float32) / 255


def which_corner(masks: torch.Tensor) -> torch.Tensor:
    """``[N]``: the index of the corner square each ``[N, 1, H, W]`` mask equals exactly (-1: none)."""
    equal = (masks[:, 0, None] == corner_masks(*masks.shape[-2:])[None]).flatten(2).all(2)  # [N, 4]
    assert int(equal.sum(1).max()) <= 1
    return torch.where(equal.any(1), equal.int().argmax(1), torch.full((masks.shape[0],), -1))


def chi_square(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Pearson's chi-square statistic of the k x k contingency table of ``a`` and ``b``."""
    table = torch.zeros(k, k, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(a.numel(), dtype=torch.float64), accumulate=True)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum())


def synthetic(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, H, W, generator=g), torch.randint(0, 10, (n,), generator=g)


# --------------------------------------------------------------------------------------------
# The rule on a synthetic pixel tensor


def test_train_squares_sit_in_a_corner_with_the_labels_grey():
    pixels, labels = synthetic(2000)
    d = add_decoys(pixels, labels, 10, train=True, seed=0)
    corner = which_corner(d.masks)
    assert bool((corner >= 0).all()), "a mask is not exactly one of the four 4 x 4 corner squares"
    assert torch.equal(corner, d.corners)
    assert torch.equal(d.classes, labels)
    square = d.images[:, 0][d.masks[:, 0]].view(-1, 16)
    assert torch.equal(square, grey(labels).view(-1, 1).expand(-1, 16))
    assert torch.equal(d.images[~d.masks], pixels[~d.masks])  # nothing else moves
    assert torch.equal(pixels, synthetic(2000)[0])  # the input is not written to


def test_test_squares_carry_a_random_class_independent_of_the_label():
    pixels, labels = synthetic(5000, seed=1)
    d = add_decoys(pixels, labels, 10, train=False, seed=0)
    assert bool((which_corner(d.masks) >= 0).all())
    square = d.images[:, 0][d.masks[:, 0]].view(-1, 16)
    assert torch.equal(square, grey(d.classes).view(-1, 1).expand(-1, 16))
    agree = float((d.classes == labels).double().mean())
    assert 0.08 < agree < 0.12, agree  # 1/10 +- 4.7 standard deviations
    counts = torch.bincount(d.classes, minlength=10)
    assert int(counts.min()) > 400 and int(counts.max()) < 600, counts  # uniform: 500 +- 4.7 sd
    # Independence: chi-square with 81 degrees of freedom (mean 81, sd 12.7); at train the same
    # statistic is enormous (the control that it can fail).
    assert chi_square(d.classes, labels) < 81 + 5 * 12.7
    assert chi_square(add_decoys(pixels, labels, 10, train=True).classes, labels) > 10_000


def test_corners_are_uniform():
    pixels, labels = synthetic(4000, seed=2)
    for train in (True, False):
        counts = torch.bincount(which_corner(add_decoys(pixels, labels, 10, train=train, seed=5).masks), minlength=4)
        assert int(counts.min()) > 880 and int(counts.max()) < 1120, counts  # 1000 +- 4.4 sd


def test_seeded_deterministic_and_separate_streams():
    pixels, labels = synthetic(500, seed=3)
    a = add_decoys(pixels, labels, 10, train=True, seed=7)
    b = add_decoys(pixels, labels, 10, train=True, seed=7)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    other = add_decoys(pixels, labels, 10, train=True, seed=8)
    assert not torch.equal(a.masks, other.masks)
    test = add_decoys(pixels, labels, 10, train=False, seed=7)
    assert not torch.equal(a.masks, test.masks)  # the test split has its own stream
    # 2 * seed + 1 (test) never meets 2 * seed' (train): seed 0's test stream is not seed 1's... nor any train stream
    assert not torch.equal(add_decoys(pixels, labels, 10, train=False, seed=0).masks,
                           add_decoys(pixels, labels, 10, train=True, seed=1).masks)


def test_bad_arguments_name_themselves():
    pixels, labels = synthetic(4)
    with pytest.raises(ValueError, match="decoy_seed"):
        add_decoys(pixels, labels, 10, train=True, seed=-1)
    with pytest.raises(TypeError, match="decoy_seed"):
        add_decoys(pixels, labels, 10, train=True, seed=True)
    with pytest.raises(TypeError, match="pixels"):
        add_decoys((pixels * 255).to(torch.uint8), labels, 10, train=True)
    with pytest.raises(ValueError, match="labels"):
        add_decoys(pixels, labels[:3], 10, train=True)
    with pytest.raises(ValueError, match="labels"):
        add_decoys(pixels, labels + 10, 10, train=True)
    with pytest.raises(ValueError, match="num_classes"):
        add_decoys(pixels, labels, 12, train=True)


# --------------------------------------------------------------------------------------------
# Loading by name: a fake MNIST folder (IDX files written here), and the real Fashion-MNIST


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def mnist_root(tmp_path):
    """``root/MNIST/raw`` holding 40 train and 30 test images: every pixel 1 (a value no grey takes)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 30)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(np.ones((n, H, W), dtype=np.uint8)))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n).astype(np.uint8)))
    return tmp_path


def test_decoy_mnist_loads_by_name_with_masks_and_the_clean_order(mnist_root):
    info = DATASET_INFO["decoy-mnist"]
    assert info.classes == DATASET_INFO["mnist"].classes and info.mean == DATASET_INFO["mnist"].mean
    assert DATASET_INFO["decoy-fashion-mnist"].classes == DATASET_INFO["fashion-mnist"].classes
    clean = load_dataset("mnist", root=mnist_root, normalize=False)
    ds = load_dataset("decoy-mnist", root=mnist_root, normalize=False)
    assert ds.name == "decoy-mnist" and ds.decoy_seed == 0 and torch.equal(ds.labels, clean.labels)
    assert ds.masks.dtype == torch.bool and ds.masks.shape == (40, 1, H, W)
    assert torch.equal(ds.decoy_labels, ds.labels)
    assert torch.equal(ds.images[~ds.masks], clean.images[~ds.masks])
    assert torch.equal(ds.images[:, 0][ds.masks[:, 0]].view(-1, 16), grey(ds.labels).view(-1, 1).expand(-1, 16))
    # __getitem__ is unchanged: (image, label)
    image, label = ds[3]
    assert image.shape == (1, H, W) and int(label) == int(ds.labels[3])
    # normalised with the base set's statistics
    normed = load_dataset("decoy-mnist", root=mnist_root)
    assert torch.allclose(normed.denormalize(normed.images), ds.images, atol=1e-6)
    test = load_dataset("decoy-mnist", root=mnist_root, train=False, decoy_seed=4, normalize=False)
    assert test.decoy_seed == 4 and test.split == "test"
    assert torch.equal(test.images[:, 0][test.masks[:, 0]].view(-1, 16),
                       grey(test.decoy_labels).view(-1, 1).expand(-1, 16))
    with pytest.raises(ValueError, match="decoy_seed"):
        load_dataset("mnist", root=mnist_root, decoy_seed=1)


def test_subset_and_resize_keep_masks_aligned(mnist_root):
    ds = load_dataset("decoy-mnist", root=mnist_root, decoy_seed=2)
    sub = ds.subset([5, 2, 7])
    assert torch.equal(sub.masks, ds.masks[[5, 2, 7]]) and torch.equal(sub.decoy_labels, ds.decoy_labels[[5, 2, 7]])
    assert sub.decoy_seed == 2
    big = load_dataset("decoy-mnist", root=mnist_root, decoy_seed=2, size=56, normalize=False)
    assert torch.equal(big.masks, ds.masks.repeat_interleave(2, 2).repeat_interleave(2, 3))  # each pixel doubled
    clean = load_dataset("mnist", root=mnist_root, size=56, normalize=False)
    changed = (big.images - clean.images).abs() > 1e-6
    near = F.max_pool2d(big.masks.float(), 3, stride=1, padding=1).bool()  # the mask grown by one pixel
    assert bool((big.masks <= changed).all()) and bool((changed <= near).all())
    small = load_dataset("decoy-mnist", root=mnist_root, decoy_seed=2, size=14)
    # nearest at pixel centres: output pixel i reads input pixel floor((i + 0.5) * 2) = 2 i + 1
    assert torch.equal(small.masks, ds.masks[:, :, 1::2, 1::2]) and bool((small.masks.sum((1, 2, 3)) == 4).all())
    odd = load_dataset("decoy-mnist", root=mnist_root, decoy_seed=2, size=32)  # not a whole factor
    src = torch.from_numpy(np.floor((np.arange(32) + 0.5) * 28 / 32).astype(np.int64))
    assert torch.equal(odd.masks, ds.masks[:, :, src][:, :, :, src])


def test_the_decoy_seed_is_recorded_and_reloaded(mnist_root):
    ds = load_dataset("decoy-mnist", root=mnist_root, decoy_seed=3)
    probe = Probe.from_dataset(ds, size=20)
    assert probe.dataset["decoy_seed"] == 3
    again = load_recorded_dataset(probe.dataset, root=mnist_root)
    assert torch.equal(again.masks, ds.masks) and torch.equal(again.images, ds.images)
    seed0 = load_recorded_dataset({**probe.dataset, "decoy_seed": 0}, root=mnist_root)
    assert not torch.equal(seed0.masks, ds.masks)
    test = load_recorded_dataset(probe.dataset, root=mnist_root, train=False)
    assert torch.equal(test.masks, load_dataset("decoy-mnist", root=mnist_root, train=False, decoy_seed=3).masks)
    assert "decoy_seed" not in Probe.from_dataset(load_dataset("mnist", root=mnist_root), size=20).dataset


@pytest.mark.skipif(not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist_round_trip():
    for train in (True, False):
        clean = load_dataset("fashion-mnist", train=train)
        ds = load_dataset("decoy-fashion-mnist", train=train)
        assert ds.mean == clean.mean == (0.2860,) and torch.equal(ds.labels, clean.labels)
        assert torch.equal(ds.images[~ds.masks], clean.images[~ds.masks])  # normalised the same, pixel for pixel
        assert bool((which_corner(ds.masks) >= 0).all())
        pixels = ds.denormalize(ds.images)[:, 0][ds.masks[:, 0]].view(-1, 16)
        assert torch.allclose(pixels, grey(ds.decoy_labels).view(-1, 1).expand(-1, 16), atol=1e-6)
        agree = float((ds.decoy_labels == ds.labels).double().mean())
        assert agree == 1.0 if train else 0.08 < agree < 0.12


def test_image_dataset_checks_masks_and_decoy_labels():
    x, y = torch.zeros(4, 1, 6, 6), torch.tensor([0, 1, 0, 1])
    ok = ImageDataset(x, y, ["a", "b"], "custom", "train", masks=torch.zeros(4, 1, 6, 6, dtype=torch.bool),
                      decoy_labels=y.clone())
    assert ok.masks is not None and ok.subset([1]).masks.shape == (1, 1, 6, 6)
    with pytest.raises(TypeError, match="masks"):
        ImageDataset(x, y, ["a", "b"], "custom", "train", masks=torch.zeros(4, 1, 6, 6))
    with pytest.raises(ValueError, match="masks"):
        ImageDataset(x, y, ["a", "b"], "custom", "train", masks=torch.zeros(4, 1, 5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks"):
        ImageDataset(x, y, ["a", "b"], "custom", "train", masks=torch.zeros(3, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="decoy_labels"):
        ImageDataset(x, y, ["a", "b"], "custom", "train", decoy_labels=y.float())
    with pytest.raises(ValueError, match="decoy_labels"):
        ImageDataset(x, y, ["a", "b"], "custom", "train", decoy_labels=y + 1)
    with pytest.raises(ValueError, match="decoy_labels"):
        ImageDataset(x, y, ["a", "b"], "custom", "train", decoy_labels=y[:2])


def test_the_command_line_names_the_decoy_datasets(capsys):
    from i2x.cli import main

    for command in (["train"], ["track"], ["curate"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
        for name in DATASET_INFO:
            assert name in text, (command, name)


# --------------------------------------------------------------------------------------------
# relevance_mass


def test_relevance_mass_by_hand():
    sal = torch.tensor([[[1.0, 2.0], [3.0, -4.0]],      # positive mass 6, inside 1 -> 1/6
                        [[0.0, 0.0], [0.0, 0.0]],       # no mass -> 0
                        [[-1.0, -2.0], [-3.0, -4.0]],   # only negative relevance -> 0
                        [[2.0, 2.0], [2.0, 3.0]]])      # inside 5 of 9
    masks = torch.tensor([[[True, False], [False, True]]] * 4)
    out = relevance_mass(sal, masks)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([1 / 6, 0.0, 0.0, 5 / 9]))
    torch.testing.assert_close(relevance_mass(sal[:, None], masks[:, None]), out)  # [B, 1, H, W] as well
    assert relevance_mass(sal.double(), masks).dtype == torch.float64
    torch.testing.assert_close(relevance_mass(sal, torch.ones_like(masks)), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(relevance_mass(sal, torch.zeros_like(masks)), torch.zeros(4))


def test_relevance_mass_refuses_bad_input():
    sal, masks = torch.rand(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="saliency"):
        relevance_mass(torch.where(sal > 0.5, float("nan"), sal), masks)
    with pytest.raises(TypeError, match="masks"):
        relevance_mass(sal, masks.float())
    with pytest.raises(ValueError, match="masks"):
        relevance_mass(sal, masks[:, :3])
    with pytest.raises(ValueError, match="saliency"):
        relevance_mass(sal[:0], masks[:0])
    with pytest.raises(ValueError, match="saliency"):
        relevance_mass(torch.rand(2, 2, 4, 4), masks)
    with pytest.raises(TypeError, match="saliency"):
        relevance_mass(sal.tolist(), masks)


# --------------------------------------------------------------------------------------------
# wrong_reason_share on models whose GradCAM can see only one region


class Window(nn.Module):
    """Logits ``w_k * sum(layer(avgpool2(x * window)))``: the model sees only the window's pixels.

    ``layer`` (a 1 x 1 conv, weight 1) is the explained layer, on a 14 x 14 grid, so the maps are
    upsampled to 28 x 28 as a real network's are."""

    def __init__(self, window: torch.Tensor, weights=(1.0, 2.0, 3.0)):
        super().__init__()
        self.register_buffer("window", window.float())
        self.layer = nn.Conv2d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.layer.weight.fill_(1.0)
        self.register_buffer("w", torch.tensor(weights))

    def forward(self, x):
        a = self.layer(F.avg_pool2d(x * self.window, 2))
        return a.sum((1, 2, 3))[:, None] * self.w


def _decoy_images(n: int = 24):
    """Clothes-like images: content in the middle, black corners, then the decoy squares."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.zeros(n, 1, H, W)
    pixels[:, :, 8:20, 8:20] = torch.rand(n, 1, 12, 12, generator=g) * 0.8 + 0.2
    d = add_decoys(pixels, torch.randint(0, 3, (n,), generator=g), 3, train=True, seed=0)
    return d.images, d.masks


def test_wrong_reason_share_is_near_one_for_a_corner_reader_and_zero_for_a_centre_reader():
    images, masks = _decoy_images()
    corners = corner_masks().any(0)
    centre = torch.zeros(H, W, dtype=torch.bool)
    centre[6:22, 6:22] = True
    reads_corners = wrong_reason_share(Window(corners), images, masks, layer="layer")
    assert reads_corners.per_image.shape == (24,)
    # The square fills 2 x 2 cells of the 14 x 14 grid; the bilinear upsample spills a little
    # relevance one pixel past it, so the share is below 1 but close.
    assert 0.8 < reads_corners.value < 1.0, reads_corners
    assert bool((reads_corners.per_image > 0.8).all())
    assert reads_corners.value == pytest.approx(float(reads_corners.per_image.mean()))
    reads_centre = wrong_reason_share(Window(centre), images, masks, layer="layer")
    assert reads_centre.value == 0.0 and bool((reads_centre.per_image == 0).all())
    # batch_size changes nothing; targets pick the class: class 0's negative weight leaves GradCAM
    # (ReLU) nothing, hence 0 by definition
    assert torch.equal(wrong_reason_share(Window(corners), images, masks, batch_size=5).per_image,
                       reads_corners.per_image)
    negative = wrong_reason_share(Window(corners, weights=(-1.0, 2.0, 3.0)), images, masks,
                                  targets=torch.zeros(24, dtype=torch.int64))
    assert negative.value == 0.0


def test_wrong_reason_share_refuses_bad_input():
    images, masks = _decoy_images(4)
    model = Window(corner_masks().any(0))
    with pytest.raises(ValueError, match="masks"):
        wrong_reason_share(model, images, masks[:, :, :14])
    with pytest.raises(ValueError, match="masks"):
        wrong_reason_share(model, images, masks[:3])
    with pytest.raises(TypeError, match="masks"):
        wrong_reason_share(model, images, masks.float())
    with pytest.raises(ValueError, match="images"):
        wrong_reason_share(model, images[:0], masks[:0])
    with pytest.raises(ValueError, match="images"):
        wrong_reason_share(model, torch.where(masks, float("nan"), images), masks)
    with pytest.raises(TypeError, match="model"):
        wrong_reason_share(lambda x: x, images, masks)
    with pytest.raises(ValueError, match="batch_size"):
        wrong_reason_share(model, images, masks, batch_size=0)
    with pytest.raises(ValueError, match="targets"):
        wrong_reason_share(model, images, masks, targets=[0, 1])


def test_exported_from_explain_and_top_level():
    assert i2x.relevance_mass is relevance_mass and i2x.explain.wrong_reason_share is wrong_reason_share
