"""Image classification datasets by name, stratified probe subsets and deterministic loaders.

Every dataset is loaded whole into tensors (:class:`ImageDataset`): ``images`` float32
``[N, C, H, W]`` scaled to [0, 1] and normalised with the dataset's fixed per-channel mean and
std, ``labels`` int64 ``[N]``. These datasets are small (Fashion-MNIST train is 188 MB as float32),
and indexing a tensor by a batch of indices is far faster than per-item PIL transforms.

Names (:data:`DATASET_INFO`): ``fashion-mnist``, ``mnist``, ``cifar10``, ``digits``, and
``decoy-fashion-mnist``, ``decoy-mnist``: the same images with Decoy-MNIST's class-coloured corner
square (:mod:`i2x.data.decoy`), found where their base dataset is found.

Where the files are looked for, in this order (the first place holding both files of the split wins):

``fashion-mnist``
    1. ``root/FashionMNIST/raw/`` (torchvision's layout) when ``root`` is given;
    2. ``$I2X_DATA/FashionMNIST/raw/``, then the folder ``$I2X_DATA`` itself (the four files
       directly in it) when the environment variable ``I2X_DATA`` is set;
    3. :data:`DEBIAN_FASHION_MNIST_DIR` (``/usr/share/datasets/fashion-mnist``, the Debian package
       ``dataset-fashion-mnist``), so an installed system copy is found with no configuration.
``mnist``
    1. ``root/MNIST/raw/``; 2. ``$I2X_DATA/MNIST/raw/`` (not ``$I2X_DATA`` itself: MNIST's file
    names are the same as Fashion-MNIST's, and files directly in ``$I2X_DATA`` are Fashion-MNIST).
``cifar10``
    1. ``root/cifar-10-batches-py/``; 2. ``$I2X_DATA/cifar-10-batches-py/``.
``decoy-fashion-mnist``, ``decoy-mnist``
    where ``fashion-mnist`` / ``mnist`` are found.
``digits``
    ships with scikit-learn (``sklearn.datasets.load_digits``); nothing to find.

In each folder an IDX file is taken uncompressed (``train-images-idx3-ubyte``) or gzipped
(``train-images-idx3-ubyte.gz``), the uncompressed one first. IDX files are read by
:func:`read_idx` (no third-party parser). ``download=True`` is used only when no copy was found:
torchvision then downloads into ``root`` and the files are read from there.

CIFAR-10's official python batches are pickles. i2x never unpickles anything itself; the one
place the official format forces it is here, and it goes through
``torchvision.datasets.CIFAR10``, which checks every file's md5 against the official archive
before unpickling it. Nothing else in this module reads a pickle.
"""

from __future__ import annotations

import gzip
import math
import numbers
import operator
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

from i2x._internal.checks import check_int, describe
from i2x.data.decoy import add_decoys

__all__ = [
    "load_recorded_dataset",
    "dataset_for_run",
    "check_dataset_for_run",
    "training_subset",
    "held_out_images",
    "HELD_OUT_SIZE",
    "batch_of",
    "labels_of",
    "DATASET_INFO",
    "DECOY_BASE",
    "DEBIAN_FASHION_MNIST_DIR",
    "DIGITS_SIZE",
    "DIGITS_TEST_FRACTION",
    "DatasetInfo",
    "ENV_VAR",
    "ImageDataset",
    "load_dataset",
    "make_loader",
    "read_idx",
    "stratified_subset",
]

# Where Debian's package `dataset-fashion-mnist` installs the four original .gz files. A module
# constant (read at call time) so that tests and unusual installs can point it elsewhere.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "I2X_DATA"

# scikit-learn's digits are 8 x 8; resized bilinearly to 28 x 28 by default so that they share
# the MNIST-sized networks and target-layer grids (7 x 7 at layer3 of SmallResNet).
DIGITS_SIZE = 28
# digits has no official split: a stratified, seeded 80/20 split (see `_split_digits`).
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
# The decoy datasets: name -> the dataset whose images get the decoy squares.
DECOY_BASE = {"decoy-fashion-mnist": "fashion-mnist", "decoy-mnist": "mnist"}


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: ``channels`` x ``size`` x ``size`` images of ``len(classes)`` classes.

    ``mean`` / ``std``: per-channel statistics of the training images scaled to [0, 1], used to
    normalise (``(x - mean) / std``). ``size`` is the size :func:`load_dataset` returns by default
    (digits: after the resize from ``native_size`` 8).
    """

    name: str
    channels: int
    size: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    native_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DATASET_INFO: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 1, 28,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        # Computed over the 60000 training images (0.28604, 0.35302).
        (0.2860,), (0.3530,), 28,
    ),
    "mnist": DatasetInfo("mnist", 1, 28, tuple(str(d) for d in range(10)), (0.1307,), (0.3081,), 28),
    "cifar10": DatasetInfo(
        "cifar10", 3, 32,
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        # Per-channel mean and (population) std over the 50000 training images.
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32,
    ),
    # Computed over all 1797 images divided by 16 and resized to 28 x 28 (0.30526, 0.32469): the
    # upsampling keeps the mean but smooths the std down from 0.37605 at 8 x 8, so other sizes
    # are normalised only approximately to unit std.
    "digits": DatasetInfo("digits", 1, DIGITS_SIZE, tuple(str(d) for d in range(10)), (0.3053,), (0.3247,), 8),
}
# The decoy sets keep their base set's classes and statistics: a pixel outside the square is then
# normalised exactly as in the clean set, so the two can be compared pixel for pixel.
DATASET_INFO.update({decoy: replace(DATASET_INFO[base], name=decoy) for decoy, base in DECOY_BASE.items()})

# torchvision's folder names under root (root/<name>/raw/...).
_TORCHVISION_FOLDER = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


# --------------------------------------------------------------------------------------------
# The dataset container


@dataclass(eq=False)
class ImageDataset(Dataset):
    """A whole image classification split held as tensors.

    images: ``[N, C, H, W]`` float32, ``(x / 255 - mean) / std`` per channel (or just ``x / 255``
            when loaded with ``normalize=False``: then ``mean`` is 0 and ``std`` 1)
    labels: ``[N]`` int64 in ``[0, len(classes))``
    classes: class names, index = label
    name / split: the dataset's name (a key of :data:`DATASET_INFO`) and ``"train"`` / ``"test"``
    mean / std: per-channel statistics the images were normalised with (length C), so that a
            report can show the pixels: :meth:`denormalize`
    masks:  optional ``[N, 1, H, W]`` bool, the pixels that are known to be a shortcut (the decoy
            datasets: each image's square), the ground truth for
            :func:`i2x.explain.metrics.relevance_mass`; None when unknown
    decoy_labels: optional ``[N]`` int64, the class whose grey each decoy square carries (the labels
            at train, random at test); None for a dataset without decoys
    decoy_seed: the ``decoy_seed`` the decoys were drawn with (recorded in a run, so that it
            reloads the same decoys); None for a dataset without decoys

    ``dataset[i]`` gives ``(image [C, H, W], label [])``; ``dataset[indices]`` (a sequence or 1-D
    integer tensor) gives the batch ``(images [B, C, H, W], labels [B])`` in one indexing
    operation, which :func:`make_loader` uses.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    split: str
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    masks: torch.Tensor | None = None
    decoy_labels: torch.Tensor | None = None
    decoy_seed: int | None = None

    def __post_init__(self) -> None:
        _check_images(self.images, "images")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise TypeError(f"labels: expected an int64 tensor [N], got {describe(self.labels)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"labels: expected {self.images.shape[0]} labels (one per image), got {self.labels.shape[0]}"
            )
        self.classes = list(self.classes)
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(
                f"labels: expected values in [0, {len(self.classes)}) (one per class name), got "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        if self.split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {self.split!r}")
        channels = self.images.shape[1]
        self.mean = tuple(float(m) for m in self.mean) or (0.0,) * channels
        self.std = tuple(float(s) for s in self.std) or (1.0,) * channels
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean/std: expected {channels} values each (one per channel), got {len(self.mean)} and {len(self.std)}"
            )
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std: expected positive values, got {self.std}")
        _check_masks(self.masks, self.images)
        _check_decoy_labels(self.decoy_labels, self.labels.shape[0], len(self.classes))
        if self.decoy_seed is not None:
            self.decoy_seed = check_int(self.decoy_seed, "decoy_seed", 0)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index):
        if isinstance(index, (torch.Tensor, np.ndarray)) and index.ndim == 0:
            index = operator.index(index.item())  # one position (torch's Subset hands those over)
        if isinstance(index, (torch.Tensor, np.ndarray, Sequence)) and not isinstance(index, str):
            idx = _as_index_tensor(index, len(self), "index")
            return self.images[idx], self.labels[idx]
        i = operator.index(index)
        return self.images[i], self.labels[i]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        _, c, h, w = self.images.shape
        return c, h, w

    def subset(self, indices) -> ImageDataset:
        """A new dataset holding the samples at ``indices`` (1-D integer tensor or sequence of ints),
        in that order; the tensors are copies, the names and statistics are the same."""
        idx = _as_index_tensor(indices, len(self), "indices")
        return ImageDataset(self.images[idx], self.labels[idx], list(self.classes), self.name, self.split,
                            self.mean, self.std, masks=None if self.masks is None else self.masks[idx],
                            decoy_labels=None if self.decoy_labels is None else self.decoy_labels[idx],
                            decoy_seed=self.decoy_seed)

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` ``[..., C, H, W]`` back to pixels in [0, 1]: ``x * std + mean`` per channel."""
        if not isinstance(images, torch.Tensor) or images.dim() < 3 or images.shape[-3] != len(self.mean):
            raise ValueError(f"images: expected a tensor [..., {len(self.mean)}, H, W], got {describe(images)}")
        shape = (len(self.mean), 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        return images * std + mean


# --------------------------------------------------------------------------------------------
# Loading by name


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    train: bool = True,
    download: bool = False,
    *,
    normalize: bool = True,
    size: int | None = None,
    test_fraction: float | None = None,
    split_seed: int | None = None,
    decoy_seed: int | None = None,
) -> ImageDataset:
    """One split of the dataset ``name`` as an :class:`ImageDataset` (see the module docstring for
    where the files are looked for).

    root:      a folder in torchvision's layout (``root/FashionMNIST/raw``, ``root/MNIST/raw``,
               ``root/cifar-10-batches-py``); searched first; where ``download=True`` downloads to
    train:     the training split (True) or the test split (False)
    download:  when no copy is found, let torchvision download it into ``root`` (needs ``root``;
               not used for ``digits``, which ships with scikit-learn)
    normalize: apply the dataset's mean/std (:data:`DATASET_INFO`); False keeps pixels in [0, 1]
    size:      resize every image to ``size x size`` (bilinear, ``align_corners=False``, antialiased
               when shrinking). Default: the native size; for digits :data:`DIGITS_SIZE` (28)
    test_fraction, split_seed: digits only: the share of each class held out for the test split
               (default :data:`DIGITS_TEST_FRACTION` = 0.2) and the seed choosing it (default 0)
    decoy_seed: decoy datasets only (default 0): the seed of the corners (and, at test, of the
               squares' classes); train and test draw from different streams of it
               (:func:`i2x.data.decoy.decoy_generator`). The squares are drawn on the native
               images before the resize and the normalisation; ``masks`` follow a resize by
               nearest neighbour. ``load_dataset(base, train=...)`` gives the same images without
               decoys, in the same order.

    Raises ValueError for an unknown name, FileNotFoundError (listing every place looked at and
    how to get the data) when no copy is found, ValueError for a corrupt file.
    """
    if not isinstance(name, str) or name not in DATASET_INFO:
        raise ValueError(f"name: expected one of {sorted(DATASET_INFO)}, got {name!r}")
    if not isinstance(train, bool):
        raise TypeError(f"train: expected a bool, got {type(train).__name__}")
    if size is not None:
        check_int(size, "size")
    if name != "digits" and (test_fraction is not None or split_seed is not None):
        raise ValueError(f"test_fraction/split_seed: only used for 'digits' (its split is made here), not {name!r}")
    if name not in DECOY_BASE and decoy_seed is not None:
        raise ValueError(f"decoy_seed: only used for the decoy datasets {sorted(DECOY_BASE)}, not {name!r}")
    split = "train" if train else "test"
    info = DATASET_INFO[name]
    masks = decoy_labels = None
    if name in DECOY_BASE:
        decoy_seed = 0 if decoy_seed is None else check_int(decoy_seed, "decoy_seed", 0)
        pixels, labels = _load_idx_pixels(DECOY_BASE[name], root, split, download)
        decoys = add_decoys(pixels, labels, info.num_classes, train=train, seed=decoy_seed)
        pixels, masks, decoy_labels = decoys.images, decoys.masks, decoys.classes
        del decoys
    elif name == "digits":
        pixels, labels = _load_digits_pixels(split, test_fraction, split_seed)
        size = DIGITS_SIZE if size is None else size
    elif name == "cifar10":
        pixels, labels = _load_cifar10_pixels(root, split, download)
    else:
        pixels, labels = _load_idx_pixels(name, root, split, download)
    if size is not None and size != pixels.shape[-1]:
        pixels = _resize(pixels, int(size))
        if masks is not None:
            masks = _resize_masks(masks, int(size))
    if normalize:
        mean, std = info.mean, info.std
        _normalize_(pixels, mean, std)
    else:
        mean, std = (0.0,) * info.channels, (1.0,) * info.channels
    return ImageDataset(pixels, labels, list(info.classes), name, split, mean, std, masks=masks,
                        decoy_labels=decoy_labels, decoy_seed=decoy_seed)


def training_subset(dataset: ImageDataset, size: int | None, seed: int = 0) -> tuple[ImageDataset, dict]:
    """A stratified, seeded subset of ``size`` samples (the whole dataset when ``size`` is None or
    not smaller), and the record that lets :func:`load_recorded_dataset` rebuild exactly it."""
    if size is None or size >= len(dataset):
        return dataset, {}
    check_int(size, "size (one image per class at least)", dataset.num_classes)
    return dataset.subset(stratified_subset(dataset.labels, int(size), seed=seed)), {
        "subset": {"size": int(size), "seed": int(seed)}}


#: How many images :func:`held_out_images` holds out unless told (``i2x demo``, ``i2x experiment``).
HELD_OUT_SIZE = 2_000


def held_out_images(full_train: ImageDataset, train_size: int | None, size: int | None = None,
                    subset_seed: int = 0):
    """Up to ``size`` (default :data:`HELD_OUT_SIZE`) images of ``full_train`` that
    :func:`training_subset` (``train_size``, ``subset_seed``) did not take, stratified and seeded:
    images no model of the run trained on, for an experiment to decide its recommendation on. None
    when the subset took every image (or left fewer than one per class)."""
    size = HELD_OUT_SIZE if size is None else size
    labels = full_train.labels
    if train_size is None or train_size >= labels.numel():
        return None
    keep = torch.ones(labels.numel(), dtype=torch.bool)
    keep[stratified_subset(labels, train_size, seed=subset_seed)] = False  # the rows training_subset took
    rest = keep.nonzero().flatten()
    if rest.numel() < full_train.num_classes:
        return None
    chosen = rest[stratified_subset(labels[rest], min(size, rest.numel()), seed=1)]
    return full_train.subset(chosen)


def load_recorded_dataset(record, root: str | os.PathLike | None = None, train: bool = True,
                          size: int | None = None) -> ImageDataset:
    """The dataset a run describes (its manifest's ``dataset``): the split ``train``, loaded by name
    at the recorded image ``size`` (or ``size``) and, for a decoy dataset, the recorded
    ``decoy_seed`` (default 0); for the training split also the recorded ``subset`` (as
    :func:`training_subset` drew it), so that indices stored in the run point at the same samples.

    Raises ValueError when the record names no dataset i2x can load by name (a user's own data:
    pass it to the Python API instead)."""
    name = record.get("name") if isinstance(record, dict) else None
    if name not in DATASET_INFO:
        raise ValueError(f"the run was recorded on {name!r}, which i2x cannot load by name (known: "
                         f"{', '.join(sorted(DATASET_INFO))}); pass that dataset through the Python API")
    decoy_seed = int(record.get("decoy_seed", 0)) if name in DECOY_BASE else None
    data = load_dataset(name, root=root, train=train, size=record.get("size") if size is None else size,
                        decoy_seed=decoy_seed)
    subset = record.get("subset")
    if train and subset:
        data, _ = training_subset(data, int(subset["size"]), int(subset.get("seed", 0)))
    return data


def dataset_for_run(store, name: str | None = None, root: str | os.PathLike | None = None, train: bool = True,
                    size: int | None = None) -> ImageDataset:
    """One split of the dataset ``store`` (an :class:`i2x.RunStore`) was recorded on, by name
    (default: the recorded one), with the run's training subset, checked against the run: its
    classes, its model's input channels and, for the probe's split, the probe's labels at the
    probe's positions. Every mismatch is a ValueError saying what to pass instead."""
    record = store.manifest["dataset"]
    recorded = record.get("name")
    name = recorded if name is None else name
    if recorded in DATASET_INFO and recorded != name:
        raise ValueError(f"run {store.path} was tracked on {recorded!r}, not {name!r}: pass --data {recorded}")
    if name == recorded:
        data = load_recorded_dataset(record, root=root, train=train, size=size)
    else:
        data = load_dataset(name, root=root, train=train, size=size)
    check_dataset_for_run(store, data, probe_split=(data.split == record.get("split", "train")))
    return data


def check_dataset_for_run(store, data, probe_split: bool = True) -> None:
    """``data`` must fit the run: the same classes, the channels its model takes, and (when it is
    the probe's split) the probe's labels at the probe's indices."""
    what = f"dataset {getattr(data, 'name', 'given')!r} ({getattr(data, 'split', '?')})"
    if list(data.classes) != store.classes:
        raise ValueError(f"{what} has the classes {list(data.classes)} but the run has {store.classes}: pass the "
                         "dataset the run was tracked on")
    spec = store.manifest["model"].get("build") or {}
    if "in_channels" in spec and int(spec["in_channels"]) != data.images.shape[1]:
        raise ValueError(f"{what} has {data.images.shape[1]} channel(s) but the run's model takes "
                         f"{spec['in_channels']}")
    if not probe_split:
        return
    idx, labels = store.probe()
    if int(idx.max()) >= len(data):
        raise ValueError(f"{what} has {len(data)} samples but the run's probe refers to index {int(idx.max())}: pass "
                         "the split the run was tracked on")
    wrong = int((data.labels[idx] != labels).sum())
    if wrong:
        raise ValueError(f"{what} does not match the run's probe: {wrong} of its {idx.numel()} samples have other "
                         "labels; pass the split the run was tracked on")


def _normalize_(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
    """In place (the train split is large): ``(x - mean) / std`` per channel of ``[N, C, H, W]``."""
    shape = (1, len(mean), 1, 1)
    pixels.sub_(torch.tensor(mean, dtype=pixels.dtype).view(shape)).div_(
        torch.tensor(std, dtype=pixels.dtype).view(shape))


def _resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, 1, H, W]`` bool -> ``[N, 1, size, size]`` by nearest neighbour at pixel centres
    (``nearest-exact``: the same pixel grid as the images' ``align_corners=False`` resize)."""
    return F.interpolate(masks.to(torch.uint8), size=(size, size), mode="nearest-exact").bool()


def _resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, size, size]`` bilinear; antialiased only when shrinking (where
    plain bilinear would alias), so an upsample is exactly ``F.interpolate``'s bilinear."""
    shrink = size < min(pixels.shape[-2:])
    return F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


# ---- IDX (MNIST, Fashion-MNIST)

_IDX_DTYPES: dict[int, tuple[np.dtype, type[np.generic]]] = {
    0x08: (np.dtype(">u1"), np.uint8),
    0x09: (np.dtype(">i1"), np.int8),
    0x0B: (np.dtype(">i2"), np.int16),
    0x0C: (np.dtype(">i4"), np.int32),
    0x0D: (np.dtype(">f4"), np.float32),
    0x0E: (np.dtype(">f8"), np.float64),
}


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """The array stored in an IDX file (LeCun's MNIST format), gzipped or not.

    Format: 4 magic bytes ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32 dimensions,
    then the values big-endian in row-major order. ``<type>``: 0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64. Gzip is recognised by its magic bytes, not the name.

    Returns a tensor of the file's dims and type (native byte order). Raises FileNotFoundError
    for a missing file and ValueError naming the file for a bad magic number, an unknown type, or
    a data size that differs from what the dims say (truncated file or trailing bytes).
    """
    path = Path(path)
    with open(path, "rb") as f:  # FileNotFoundError propagates as is
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file: magic bytes {raw[:4].hex(' ') or '(empty file)'}, expected 00 00 <type> <ndim>"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: unknown IDX data type 0x{type_code:02x}; expected one of "
            + ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        )
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: IDX header is truncated or has no dims: {ndim} dims need {header} bytes, "
                         f"file has {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    big_endian, native = _IDX_DTYPES[type_code]
    count = math.prod(dims)
    expected = count * big_endian.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX data size mismatch (truncated file or trailing bytes): dims {dims} of "
            f"{native.__name__} need {expected} bytes after the header, file has {len(raw) - header}"
        )
    values = np.frombuffer(raw, dtype=big_endian, count=count, offset=header).astype(native)
    return torch.from_numpy(values.reshape(dims))


def _idx_places(name: str, root) -> list[tuple[str, Path | None]]:
    """The folders to search, in order, as (how this place was chosen, folder or None if unset)."""
    folder = _TORCHVISION_FOLDER[name]
    places: list[tuple[str, Path | None]] = [
        ("root argument, torchvision layout", None if root is None else Path(root) / folder / "raw")
    ]
    env = os.environ.get(ENV_VAR) or None
    places.append((f"${ENV_VAR}, torchvision layout", None if env is None else Path(env) / folder / "raw"))
    if name == "fashion-mnist":
        places.append((f"${ENV_VAR}, the four files directly in it", None if env is None else Path(env)))
        places.append(("Debian package dataset-fashion-mnist", Path(DEBIAN_FASHION_MNIST_DIR)))
    return places


def _find_file(folder: Path, base: str) -> Path | None:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _search_idx(name: str, root, split: str) -> tuple[tuple[Path, Path] | None, list[str]]:
    """The (images, labels) files of the first place holding both, and a line per place looked at."""
    looked = []
    for how, folder in _idx_places(name, root):
        if folder is None:
            looked.append(f"{how}: " + ("root not given" if how.startswith("root") else f"${ENV_VAR} is not set"))
            continue
        found = [_find_file(folder, base) for base in _IDX_FILES[split]]
        images, labels = found
        if images is not None and labels is not None:
            return (images, labels), looked
        if not folder.is_dir():
            looked.append(f"{how}: {folder}: no such folder")
        else:
            missing = [f"{base}[.gz]" for base, f in zip(_IDX_FILES[split], found, strict=True) if f is None]
            looked.append(f"{how}: {folder}: missing {', '.join(missing)}")
    return None, looked


def _load_idx_pixels(name: str, root, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    files, looked = _search_idx(name, root, split)
    if files is None and download:
        _torchvision_download(name, root, split)
        files, looked = _search_idx(name, root, split)
    if files is None:
        raise FileNotFoundError(_not_found_message(name, split, looked))
    images, labels = read_idx(files[0]), read_idx(files[1])
    info = DATASET_INFO[name]
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (info.native_size,) * 2:
        raise ValueError(
            f"{files[0]}: expected uint8 images [N, {info.native_size}, {info.native_size}], got "
            f"{images.dtype} {tuple(images.shape)}"
        )
    if labels.dtype != torch.uint8 or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{files[1]}: expected {images.shape[0]} uint8 labels [N] (one per image in {files[0].name}), got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )
    if labels.numel() and int(labels.max()) >= info.num_classes:
        raise ValueError(f"{files[1]}: expected labels in [0, {info.num_classes}), got max {int(labels.max())}")
    pixels = images.unsqueeze(1).to(torch.float32).div_(255.0)
    return pixels, labels.to(torch.int64)


def _torchvision_download(name: str, root, split: str) -> None:
    if root is None:
        raise ValueError(f"root: download=True needs a folder to download {name!r} into, got None")
    import torchvision.datasets as tvd  # imported here: only needed to download

    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[name]
    cls(str(root), train=(split == "train"), download=True)


def _not_found_message(name: str, split: str, looked: list[str]) -> str:
    lines = [f"{name} ({split} split) was not found. Looked in, in this order:"]
    lines += [f"  {i}. {line}" for i, line in enumerate(looked, 1)]
    lines.append("To get it:")
    if name == "fashion-mnist":
        lines.append("  - apt-get install dataset-fashion-mnist (found with no configuration), or")
        lines.append(f"  - put the four .gz files in a folder and set {ENV_VAR}=/that/folder, or")
    else:
        where = "cifar-10-batches-py" if name == "cifar10" else f"{_TORCHVISION_FOLDER[name]}/raw"
        lines.append(f"  - set {ENV_VAR}=/a/folder holding {where}/, or")
    lines.append(f"  - load_dataset({name!r}, root='/a/folder', download=True) (torchvision downloads it there)")
    return "\n".join(lines)


# ---- CIFAR-10


def _load_cifar10_pixels(root, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    folder, looked = _search_cifar10(root)
    if folder is None and download:
        _torchvision_download("cifar10", root, split)
        folder, looked = _search_cifar10(root)
    if folder is None:
        raise FileNotFoundError(_not_found_message("cifar10", split, looked))
    import torchvision.datasets as tvd

    # The one place a pickle is read: the official batches are pickles, and torchvision checks
    # each file's md5 against the official release before it unpickles it.
    try:
        ds = tvd.CIFAR10(str(folder.parent), train=(split == "train"), download=False)
    except RuntimeError as e:
        raise ValueError(f"{folder}: CIFAR-10 files failed torchvision's integrity check: {e}") from e
    data = np.asarray(ds.data)
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (32, 32, 3):
        raise ValueError(f"{folder}: expected uint8 images [N, 32, 32, 3], got {data.dtype} {data.shape}")
    labels = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
    pixels = torch.from_numpy(data).permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()
    return pixels, labels


def _search_cifar10(root) -> tuple[Path | None, list[str]]:
    looked = []
    env = os.environ.get(ENV_VAR) or None
    places = [("root argument", root), (f"${ENV_VAR}", env)]
    for how, base in places:
        if base is None:
            looked.append(f"{how}: " + ("root not given" if how.startswith("root") else f"${ENV_VAR} is not set"))
            continue
        folder = Path(base) / _CIFAR_FOLDER
        # All six batches: torchvision checks the train and the test batches for either split.
        missing = [f for f in _CIFAR_FILES["train"] + _CIFAR_FILES["test"] + ("batches.meta",)
                   if not (folder / f).is_file()]
        if not missing:
            return folder, looked
        looked.append(f"{how}: {folder}: "
                      + ("no such folder" if not folder.is_dir() else f"missing {', '.join(missing)}"))
    return None, looked


# ---- digits


def _load_digits_pixels(split: str, test_fraction, split_seed) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # ships with scikit-learn, no download

    test_fraction = DIGITS_TEST_FRACTION if test_fraction is None else test_fraction
    split_seed = DIGITS_SPLIT_SEED if split_seed is None else split_seed
    if (isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real)
            or not 0 < float(test_fraction) < 1):
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    digits = load_digits()
    pixels = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # [1797, 1, 8, 8]
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    test = _split_digits(labels, float(test_fraction), split_seed)
    keep = test if split == "test" else _complement(test, labels.shape[0])
    return pixels[keep], labels[keep]


def _split_digits(labels: torch.Tensor, test_fraction: float, seed: int) -> torch.Tensor:
    """The test indices: ``round(test_fraction * N)`` samples, stratified (:func:`stratified_subset`)."""
    return stratified_subset(labels, max(1, round(test_fraction * labels.shape[0])), seed=seed)


def _complement(indices: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[indices] = False
    return mask.nonzero().flatten()


# --------------------------------------------------------------------------------------------
# Probe subsets and loaders


def stratified_subset(labels, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` samples whose class proportions follow ``labels``'.

    labels: ``[N]`` integer tensor (or sequence of ints); any label values
    n:      how many; ``n >= N`` returns every index ``arange(N)``

    Per class ``c`` with ``N_c`` samples the quota is ``n * N_c / N``; each class gets its floor and
    the ``n - sum(floors)`` left over go one each to the largest fractional remainders (ties: the
    smaller label first). If ``n`` is at least the number of classes present, a class left with 0
    takes one sample from the class furthest above its quota (ties: smaller label), so every class
    appears. Within a class the samples are drawn uniformly without replacement from a
    ``torch.Generator`` seeded with ``seed`` (classes in ascending label order).

    Returns an int64 tensor ``[n]`` of indices, sorted ascending; the same for the same seed.
    """
    labels = _as_label_tensor(labels)
    n = check_int(n, "n")
    seed = check_int(seed, "seed", None)
    total = labels.shape[0]
    if total == 0:
        raise ValueError("labels: expected at least one label, got an empty tensor")
    if n >= total:
        return torch.arange(total, dtype=torch.int64)
    classes, counts = torch.unique(labels, sorted=True, return_counts=True)
    allocation = _largest_remainder(counts.tolist(), int(n))
    gen = torch.Generator().manual_seed(int(seed))
    chosen = []
    for value, take in zip(classes.tolist(), allocation, strict=True):
        members = (labels == value).nonzero().flatten()
        chosen.append(members[torch.randperm(members.numel(), generator=gen)[:take]])
    return torch.cat(chosen).sort().values


def _largest_remainder(counts: list[int], n: int) -> list[int]:
    """Split ``n`` (< sum(counts)) over classes in proportion to ``counts`` (see stratified_subset)."""
    total = sum(counts)
    # Exact rational arithmetic (n * count / total as quotient and remainder) so ties are real ties.
    floors = [n * c // total for c in counts]
    remainders = [n * c % total for c in counts]
    order = sorted(range(len(counts)), key=lambda k: (-remainders[k], k))
    for k in order[: n - sum(floors)]:
        floors[k] += 1
    if n >= len(counts):
        for k in range(len(counts)):
            if floors[k] == 0:
                # Furthest above quota: largest floors[j] * total - n * counts[j] (scaled by total).
                donor = max((j for j in range(len(counts)) if floors[j] > 1),
                            key=lambda j: (floors[j] * total - n * counts[j], -j))
                floors[donor] -= 1
                floors[k] = 1
    return floors


def make_loader(dataset: Dataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A deterministic ``DataLoader``: ``num_workers=0`` and, when shuffling, a ``torch.Generator``
    seeded with ``seed`` owned by the loader, so two loaders made with the same arguments yield the
    same batches epoch after epoch (each epoch draws its own permutation from that generator).

    For an :class:`ImageDataset` each batch is fetched with one indexing operation and is the tuple
    ``(images [B, C, H, W], labels [B])``; any other dataset goes through the default collate.
    """
    batch_size = check_int(batch_size, "batch_size")
    seed = check_int(seed, "seed", None)
    gen = torch.Generator().manual_seed(int(seed))
    if not isinstance(dataset, ImageDataset):
        return DataLoader(dataset, batch_size=int(batch_size), shuffle=bool(shuffle), generator=gen,
                          num_workers=0, drop_last=bool(drop_last))
    sampler = RandomSampler(dataset, generator=gen) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(sampler, batch_size=int(batch_size), drop_last=bool(drop_last))
    # batch_size=None: the sampler yields whole batches of indices and dataset[indices] is the batch.
    return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=0, collate_fn=_identity,
                      generator=gen)


def _identity(batch):
    return batch


# --------------------------------------------------------------------------------------------
# Batches of any dataset


def batch_of(dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [B, C, H, W], labels [B])`` of ``dataset`` at ``indices``: one indexing operation
    for an :class:`ImageDataset` or a dataset with an ``i2x_batch(indices)`` method (the
    ``i2x.loop.strategies`` wrappers), item by item otherwise."""
    indices = torch.as_tensor(indices, dtype=torch.int64)
    getter = getattr(dataset, "i2x_batch", None)
    if getter is not None:
        return getter(indices)
    if isinstance(dataset, ImageDataset):
        return dataset[indices]
    images, labels = [], []
    for i in indices.tolist():
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2 or not isinstance(item[0], torch.Tensor):
            raise TypeError(f"dataset[{i}]: expected an (image tensor, label) pair, got {describe(item)}")
        images.append(item[0])
        labels.append(int(item[1]))
    if not images:
        raise ValueError("batch_of: no indices")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def labels_of(dataset) -> torch.Tensor:
    """``[N]`` int64 labels of any ``(image, label)`` dataset: its ``.labels`` / ``.targets`` (i2x's
    and torchvision's), a ``TensorDataset``'s second tensor, a ``Subset``'s parent's at its
    indices, and item by item otherwise."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2 and dataset.tensors[1].dim() == 1:
        return dataset.tensors[1].long()
    for attr in ("labels", "targets"):  # i2x's / torchvision's names for them
        labels = getattr(dataset, attr, None)
        if isinstance(labels, (list, tuple, np.ndarray)) and len(labels) == len(dataset):
            labels = torch.as_tensor(np.asarray(labels))
        if isinstance(labels, torch.Tensor) and labels.dim() == 1 and len(labels) == len(dataset):
            return labels.long()
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.int64)]
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Checks


def _check_images(images, arg: str) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise TypeError(f"{arg}: expected a floating tensor [N, C, H, W], got {describe(images)}")


def _check_masks(masks, images: torch.Tensor) -> None:
    if masks is None:
        return
    n, _, h, w = images.shape
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
        raise TypeError(f"masks: expected None or a bool tensor [N, 1, H, W], got {describe(masks)}")
    if tuple(masks.shape) != (n, 1, h, w):
        raise ValueError(f"masks: expected shape {[n, 1, h, w]} (one mask per image, at the images' size), got "
                         f"{list(masks.shape)}")


def _check_decoy_labels(decoy_labels, n: int, num_classes: int) -> None:
    if decoy_labels is None:
        return
    if not isinstance(decoy_labels, torch.Tensor) or decoy_labels.dtype != torch.int64 or decoy_labels.dim() != 1:
        raise TypeError(f"decoy_labels: expected None or an int64 tensor [N], got {describe(decoy_labels)}")
    if decoy_labels.shape[0] != n:
        raise ValueError(f"decoy_labels: expected {n} values (one per image), got {decoy_labels.shape[0]}")
    if n and (int(decoy_labels.min()) < 0 or int(decoy_labels.max()) >= num_classes):
        raise ValueError(f"decoy_labels: expected values in [0, {num_classes}), got "
                         f"[{int(decoy_labels.min())}, {int(decoy_labels.max())}]")


def _as_label_tensor(labels) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(np.asarray(labels))
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected integer labels, got {describe(labels)}")
    if labels.dim() != 1:
        raise ValueError(f"labels: expected a 1-D tensor [N], got shape {tuple(labels.shape)}")
    return labels.to(torch.int64).cpu()


def _as_index_tensor(indices, n: int, arg: str) -> torch.Tensor:
    idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices, dtype=np.int64))
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dtype.is_complex:
        raise TypeError(f"{arg}: expected integer indices, got {describe(idx)}")
    if idx.dim() != 1:
        raise ValueError(f"{arg}: expected a 1-D sequence of indices, got shape {tuple(idx.shape)}")
    idx = idx.to(torch.int64).cpu()
    if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise IndexError(f"{arg}: expected indices in [-{n}, {n}), got [{int(idx.min())}, {int(idx.max())}]")
    return idx
