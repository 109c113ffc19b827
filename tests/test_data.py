"""Tests for i2x.data: the IDX reader, where datasets are found, their contents, probe subsets, loaders.

Truths: IDX files written here byte by byte with ``struct`` (independent of the reader), CIFAR-10
batches written here in the official pickle layout, scikit-learn's own digits array, a numpy
bilinear resize written out from its definition, and hand-computed largest-remainder counts.
"""

from __future__ import annotations

import collections
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from i2x import data
from i2x.data import DATASET_INFO, ImageDataset, load_dataset, make_loader, read_idx, stratified_subset

REAL_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --------------------------------------------------------------------------------------------
# Writing files in the real formats


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding written from the format's definition: 00 00 type ndim, big-endian dims, data."""
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}
    code = codes[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.uint8)


def write_mnist_folder(folder: Path, seed: int, gz: bool = True, n_train: int = 12, n_test: int = 5) -> dict:
    """The four IDX files of a small MNIST-format dataset in ``folder``; returns the arrays."""
    train_x, train_y = fake_split(n_train, seed)
    test_x, test_y = fake_split(n_test, seed + 1000)
    for name, arr in zip(IDX_NAMES, (train_x, train_y, test_x, test_y)):
        write_idx(folder / name, arr, gz)
    return {"train": (train_x, train_y), "test": (test_x, test_y)}


def expected_images(pixels: np.ndarray, name: str) -> torch.Tensor:
    """``[N, H, W]`` uint8 -> the normalised ``[N, 1, H, W]`` float32 load_dataset should return."""
    info = DATASET_INFO[name]
    x = torch.from_numpy(pixels.astype(np.float64) / 255.0).unsqueeze(1)
    return ((x - info.mean[0]) / info.std[0]).float()


def assert_loaded(ds: ImageDataset, arrays: tuple[np.ndarray, np.ndarray], name: str, split: str) -> None:
    pixels, labels = arrays
    assert ds.name == name and ds.split == split
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    assert ds.images.shape == (len(labels), 1, 28, 28)
    torch.testing.assert_close(ds.images, expected_images(pixels, name), rtol=0, atol=1e-6)
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    assert ds.classes == list(DATASET_INFO[name].classes)
    assert ds.mean == DATASET_INFO[name].mean and ds.std == DATASET_INFO[name].std


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No I2X_DATA and an empty Debian folder: only what a test sets up is found."""
    monkeypatch.delenv("I2X_DATA", raising=False)
    empty = tmp_path / "debian-empty"
    empty.mkdir()
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", empty)
    return empty


# --------------------------------------------------------------------------------------------
# IDX reader


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_uint8_images(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 7
    path = write_idx(tmp_path / "x-idx3-ubyte", arr, gz)
    out = read_idx(path)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 4)
    assert torch.equal(out, torch.from_numpy(arr))


def test_read_idx_hand_written_bytes(tmp_path):
    # int16 [2] = 0x0102, 0xfffe  -> 258, -2 (big-endian, two's complement)
    (tmp_path / "a").write_bytes(b"\x00\x00\x0b\x01" + b"\x00\x00\x00\x02" + b"\x01\x02\xff\xfe")
    assert read_idx(tmp_path / "a").tolist() == [258, -2]
    # float32 [1, 2] = 1.0 (3f800000), -2.5 (c0200000)
    (tmp_path / "b").write_bytes(b"\x00\x00\x0d\x02" + b"\x00\x00\x00\x01\x00\x00\x00\x02" + bytes.fromhex("3f800000c0200000"))
    out = read_idx(tmp_path / "b")
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, -2.5]]
    # int32 [1] = 0x00010000 = 65536; float64 [1] = 0.5 (3fe0000000000000)
    (tmp_path / "c").write_bytes(b"\x00\x00\x0c\x01" + b"\x00\x00\x00\x01" + b"\x00\x01\x00\x00")
    assert read_idx(tmp_path / "c").tolist() == [65536]
    (tmp_path / "d").write_bytes(b"\x00\x00\x0e\x01" + b"\x00\x00\x00\x01" + bytes.fromhex("3fe0000000000000"))
    assert read_idx(tmp_path / "d").dtype == torch.float64 and read_idx(tmp_path / "d").tolist() == [0.5]


def test_read_idx_zero_length_dim(tmp_path):
    path = write_idx(tmp_path / "empty", np.zeros((0, 28, 28), np.uint8), gz=False)
    assert read_idx(path).shape == (0, 28, 28)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "not an IDX file"),  # bad magic
        (b"", "not an IDX file"),  # empty file
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX data type 0x07"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "header is truncated"),  # 3 dims announced, 1 present
        (b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x03" + b"\x00" * 5, "size mismatch"),  # 5 of 6 bytes
        (b"\x00\x00\x08\x01\x00\x00\x00\x02" + b"\x00" * 3, "size mismatch"),  # trailing byte
        (b"\x00\x00\x0c\x01\x00\x00\x00\x02" + b"\x00" * 7, "size mismatch"),  # int32: 7 of 8 bytes
    ],
    ids=["magic", "empty", "dtype", "header", "truncated", "trailing", "truncated-int32"],
)
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_corrupt(tmp_path, payload, match, gz):
    path = tmp_path / "bad-idx"
    path.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_gzip_stream(tmp_path):
    full = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8).reshape(10, 100) % 251))
    path = tmp_path / "cut.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: where it is found, in order


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_fashion_from_root_torchvision_layout(tmp_path, clean_env, gz):
    arrays = write_mnist_folder(tmp_path / "root" / "FashionMNIST" / "raw", seed=1, gz=gz)
    assert_loaded(load_dataset("fashion-mnist", root=tmp_path / "root"), arrays["train"], "fashion-mnist", "train")
    assert_loaded(load_dataset("fashion-mnist", root=str(tmp_path / "root"), train=False), arrays["test"],
                  "fashion-mnist", "test")


def test_uncompressed_file_preferred_over_gz(tmp_path, clean_env):
    folder = tmp_path / "root" / "FashionMNIST" / "raw"
    raw = write_mnist_folder(folder, seed=1, gz=False)
    write_mnist_folder(folder, seed=2, gz=True)  # different content beside it
    assert_loaded(load_dataset("fashion-mnist", root=tmp_path / "root"), raw["train"], "fashion-mnist", "train")


@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_fashion_from_env_var(tmp_path, clean_env, monkeypatch, layout):
    base = tmp_path / "env"
    folder = base / "FashionMNIST" / "raw" if layout == "torchvision" else base
    arrays = write_mnist_folder(folder, seed=3)
    monkeypatch.setenv("I2X_DATA", str(base))
    assert_loaded(load_dataset("fashion-mnist", train=False), arrays["test"], "fashion-mnist", "test")


def test_fashion_from_debian_path(tmp_path, monkeypatch):
    monkeypatch.delenv("I2X_DATA", raising=False)
    arrays = write_mnist_folder(tmp_path / "debian", seed=4)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")
    assert_loaded(load_dataset("fashion-mnist"), arrays["train"], "fashion-mnist", "train")


def test_fashion_search_order(tmp_path, monkeypatch):
    """root, then $I2X_DATA (torchvision layout, then flat), then the Debian folder."""
    root = write_mnist_folder(tmp_path / "root" / "FashionMNIST" / "raw", seed=10)
    env_tv = write_mnist_folder(tmp_path / "env" / "FashionMNIST" / "raw", seed=11)
    env_flat = write_mnist_folder(tmp_path / "env", seed=12)
    debian = write_mnist_folder(tmp_path / "debian", seed=13)
    monkeypatch.setenv("I2X_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")
    assert_loaded(load_dataset("fashion-mnist", root=tmp_path / "root"), root["train"], "fashion-mnist", "train")
    # A root without the dataset falls through to the next places.
    assert_loaded(load_dataset("fashion-mnist", root=tmp_path / "elsewhere"), env_tv["train"], "fashion-mnist", "train")
    for name in IDX_NAMES:
        (tmp_path / "env" / "FashionMNIST" / "raw" / f"{name}.gz").unlink()
    assert_loaded(load_dataset("fashion-mnist"), env_flat["train"], "fashion-mnist", "train")
    monkeypatch.delenv("I2X_DATA")
    assert_loaded(load_dataset("fashion-mnist"), debian["train"], "fashion-mnist", "train")


def test_fashion_missing_lists_every_place(tmp_path, clean_env, monkeypatch):
    monkeypatch.setenv("I2X_DATA", str(tmp_path / "env-folder"))
    partial = tmp_path / "root" / "FashionMNIST" / "raw"
    write_idx(partial / "train-images-idx3-ubyte", fake_split(3, 0)[0], gz=True)  # labels missing
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", root=tmp_path / "root")
    msg = str(info.value)
    for place in (partial, tmp_path / "env-folder" / "FashionMNIST" / "raw", tmp_path / "env-folder", clean_env):
        assert str(place) in msg
    assert "missing train-labels-idx1-ubyte[.gz]" in msg
    assert "no such folder" in msg
    for hint in ("apt-get install dataset-fashion-mnist", "I2X_DATA=", "download=True"):
        assert hint in msg
    # The places appear in search order.
    positions = [msg.index(str(p)) for p in (partial, tmp_path / "env-folder" / "FashionMNIST", clean_env)]
    assert positions == sorted(positions)


def test_missing_without_root_or_env_says_so(clean_env):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", train=False)
    msg = str(info.value)
    assert "root not given" in msg and "$I2X_DATA is not set" in msg and str(clean_env) in msg
    assert "test split" in msg


def test_inconsistent_files_raise_value_error(tmp_path, clean_env):
    folder = tmp_path / "root" / "FashionMNIST" / "raw"
    x, y = fake_split(6, 0)
    write_idx(folder / "train-images-idx3-ubyte", x, gz=True)
    write_idx(folder / "train-labels-idx1-ubyte", y[:5], gz=True)
    with pytest.raises(ValueError, match="expected 6 uint8 labels"):
        load_dataset("fashion-mnist", root=tmp_path / "root")
    write_idx(folder / "train-labels-idx1-ubyte", np.full(6, 10, np.uint8), gz=True)
    with pytest.raises(ValueError, match=r"labels in \[0, 10\)"):
        load_dataset("fashion-mnist", root=tmp_path / "root")
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((6, 27, 28), np.uint8), gz=True)
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, 28, 28\]"):
        load_dataset("fashion-mnist", root=tmp_path / "root")


def test_real_debian_fashion_mnist(monkeypatch):
    if not REAL_DEBIAN.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{REAL_DEBIAN} is absent but CI is set: install dataset-fashion-mnist on the CI image")
        pytest.skip(f"{REAL_DEBIAN} is absent (apt-get install dataset-fashion-mnist to run this test)")
    monkeypatch.delenv("I2X_DATA", raising=False)
    assert data.DEBIAN_FASHION_MNIST_DIR == REAL_DEBIAN
    train, test = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", train=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    # Fashion-MNIST is balanced: 6000 / 1000 images per class.
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    # The constants were computed on this training set: normalised, it has mean 0 and std 1.
    assert abs(train.images.mean().item()) < 1e-3 and abs(train.images.std().item() - 1) < 1e-3
    pixels = train.denormalize(train.images[:100])
    assert pixels.min() > -1e-6 and pixels.max() < 1 + 1e-6
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"


# --------------------------------------------------------------------------------------------
# MNIST


def test_mnist_from_root_and_env(tmp_path, clean_env, monkeypatch):
    arrays = write_mnist_folder(tmp_path / "root" / "MNIST" / "raw", seed=5, gz=False)
    assert_loaded(load_dataset("mnist", root=tmp_path / "root"), arrays["train"], "mnist", "train")
    monkeypatch.setenv("I2X_DATA", str(tmp_path / "root"))
    assert_loaded(load_dataset("mnist", train=False), arrays["test"], "mnist", "test")


def test_mnist_ignores_flat_files_in_env_and_fashion_folders(tmp_path, clean_env, monkeypatch):
    # Same file names as Fashion-MNIST: flat files in $I2X_DATA are Fashion-MNIST, never MNIST.
    write_mnist_folder(tmp_path / "env", seed=6)
    write_mnist_folder(tmp_path / "root" / "FashionMNIST" / "raw", seed=7)
    monkeypatch.setenv("I2X_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError, match="MNIST/raw") as info:
        load_dataset("mnist", root=tmp_path / "root")
    assert "dataset-fashion-mnist" not in str(info.value)


def test_mnist_download_delegates_to_torchvision(tmp_path, clean_env, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            write_mnist_folder(Path(root) / "MNIST" / "raw", seed=8)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    ds = load_dataset("mnist", root=tmp_path / "dl", train=False, download=True)
    assert calls == [(str(tmp_path / "dl"), False, True)]
    assert_loaded(ds, write_mnist_folder(tmp_path / "again", seed=8)["test"], "mnist", "test")
    # Found locally now: no second download.
    load_dataset("mnist", root=tmp_path / "dl", download=True)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="root"):
        load_dataset("mnist", download=True)


# --------------------------------------------------------------------------------------------
# CIFAR-10 (small files in the official pickle layout, read only through torchvision)


def write_cifar_folder(root: Path, per_batch: int = 3) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        # Official layout: 'data' uint8 [n, 3072] = R plane (32x32 row-major), G plane, B plane.
        flat = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": flat, "labels": labels, "batch_label": name}, f)
        split = "test" if name == "test_batch" else "train"
        out[split][0].append(flat)
        out[split][1].extend(labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(DATASET_INFO["cifar10"].classes)}, f)
    return {k: (np.concatenate(v[0]), np.array(v[1])) for k, v in out.items()}


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """The fake batches cannot match the official md5s that torchvision checks before
    unpickling (``_check_integrity`` for the batches, ``check_integrity`` in ``_load_meta`` for
    batches.meta), so this test alone turns the check off."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)


@pytest.mark.parametrize("train", [True, False])
def test_cifar10_from_official_layout(tmp_path, clean_env, skip_cifar_md5, train):
    arrays = write_cifar_folder(tmp_path / "root")
    ds = load_dataset("cifar10", root=tmp_path / "root", train=train)
    flat, labels = arrays["train" if train else "test"]
    assert ds.images.shape == (len(labels), 3, 32, 32) and ds.images.dtype == torch.float32
    # images[n, c, h, w] = data[n, c * 1024 + h * 32 + w] / 255, normalised per channel.
    planes = torch.from_numpy(flat.astype(np.float64) / 255.0).view(-1, 3, 32, 32)
    mean = torch.tensor(DATASET_INFO["cifar10"].mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(DATASET_INFO["cifar10"].std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(ds.images, ((planes - mean) / std).float(), rtol=0, atol=1e-6)
    assert ds.labels.tolist() == labels.tolist()
    assert ds.classes[3] == "cat" and ds.classes[5] == "dog"


def test_cifar10_from_env(tmp_path, clean_env, skip_cifar_md5, monkeypatch):
    arrays = write_cifar_folder(tmp_path / "env")
    monkeypatch.setenv("I2X_DATA", str(tmp_path / "env"))
    assert load_dataset("cifar10", train=False).labels.tolist() == arrays["test"][1].tolist()


def test_cifar10_failed_integrity_is_a_value_error(tmp_path, clean_env):
    write_cifar_folder(tmp_path / "root")
    with pytest.raises(ValueError, match="integrity check"):
        load_dataset("cifar10", root=tmp_path / "root")


def test_cifar10_missing(tmp_path, clean_env):
    (tmp_path / "root" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "root" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path / "root")
    msg = str(info.value)
    assert str(tmp_path / "root" / "cifar-10-batches-py") in msg and "data_batch_2" in msg
    assert "$I2X_DATA is not set" in msg and "download=True" in msg


# --------------------------------------------------------------------------------------------
# digits


def bilinear_reference(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False) from its definition: output
    pixel i samples the input at (i + 0.5) * in / out - 0.5, clamped to [0, in - 1]."""
    n_in = img.shape[0]
    src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = src - lo
    rows = img[lo] * (1 - w)[:, None] + img[hi] * w[:, None]
    return rows[:, lo] * (1 - w)[None, :] + rows[:, hi] * w[None, :]


def test_digits_split_resize_and_values():
    from sklearn.datasets import load_digits

    digits = load_digits()
    train8 = load_dataset("digits", size=8, normalize=False)
    test8 = load_dataset("digits", size=8, normalize=False, train=False)
    assert len(train8) == 1438 and len(test8) == 359  # round(0.2 * 1797) = 359 held out
    assert train8.split == "train" and test8.split == "test"
    # Together the two splits are exactly sklearn's images (/ 16) with their labels.
    def key(img, label):  # img in 0..16
        return (np.asarray(img, dtype=np.float64).round().astype(np.int64).tobytes(), int(label))

    ours = collections.Counter(key(x[0].numpy() * 16, y) for ds in (train8, test8) for x, y in zip(ds.images, ds.labels))
    truth = collections.Counter(key(x, y) for x, y in zip(digits.images, digits.target))
    assert ours == truth
    # Stratified: each class's test share within one sample of 20%.
    counts = np.bincount(digits.target, minlength=10)
    test_counts = torch.bincount(test8.labels, minlength=10).numpy()
    assert np.all(np.abs(test_counts - 0.2 * counts) < 1)

    train28 = load_dataset("digits", normalize=False)
    assert train28.images.shape == (1438, 1, 28, 28) and train28.image_shape == (1, 28, 28)
    expected = np.stack([bilinear_reference(x[0].numpy().astype(np.float64), 28) for x in train8.images[:50]])
    np.testing.assert_allclose(train28.images[:50, 0].numpy(), expected, rtol=0, atol=1e-6)
    assert train28.images.min() >= 0 and train28.images.max() <= 1

    normalised = load_dataset("digits")
    info = DATASET_INFO["digits"]
    torch.testing.assert_close(normalised.images, (train28.images - info.mean[0]) / info.std[0])
    torch.testing.assert_close(normalised.denormalize(normalised.images), train28.images, rtol=0, atol=1e-6)


def test_digits_split_is_seeded():
    a = load_dataset("digits", train=False, size=8)
    b = load_dataset("digits", train=False, size=8)
    c = load_dataset("digits", train=False, size=8, split_seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert len(load_dataset("digits", train=False, size=8, test_fraction=0.5)) == round(0.5 * 1797)


# --------------------------------------------------------------------------------------------
# Argument errors and the container


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    for name in ("fashion-mnist", "mnist", "cifar10", "digits"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(name="digits", size=0), ValueError, "size"),
        (dict(name="digits", test_fraction=1.0), ValueError, "test_fraction"),
        (dict(name="mnist", split_seed=1), ValueError, "only used for 'digits'"),
        (dict(name="digits", train="yes"), TypeError, "train"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_dataset(**kwargs)


def small_dataset(n: int = 10, classes: int = 3) -> ImageDataset:
    # image i is filled with the value i, so a batch shows which samples it holds
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = torch.arange(n) % classes
    return ImageDataset(images, labels, [f"c{k}" for k in range(classes)], "digits", "train")


def test_image_dataset_indexing_and_subset():
    ds = small_dataset()
    assert len(ds) == 10 and ds.num_classes == 3 and ds.mean == (0.0,) and ds.std == (1.0,)
    image, label = ds[4]
    assert image.shape == (1, 2, 2) and image[0, 0, 0] == 4 and label == 1
    images, labels = ds[[7, 2]]
    assert images[:, 0, 0, 0].tolist() == [7, 2] and labels.tolist() == [1, 2]
    sub = ds.subset(torch.tensor([9, 0, 3]))
    assert isinstance(sub, ImageDataset) and sub.images[:, 0, 0, 0].tolist() == [9, 0, 3]
    assert sub.labels.tolist() == [0, 0, 0] and sub.classes == ds.classes and sub.name == ds.name
    with pytest.raises(IndexError, match="indices"):
        ds.subset([10])
    with pytest.raises(TypeError, match="indices"):
        ds.subset(torch.tensor([0.5]))


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(images=torch.zeros(3, 2, 2)), TypeError, "images"),
        (dict(labels=torch.zeros(3, dtype=torch.int32)), TypeError, "labels"),
        (dict(labels=torch.zeros(4, dtype=torch.int64)), ValueError, "3 labels"),
        (dict(labels=torch.tensor([0, 1, 5])), ValueError, "labels"),
        (dict(split="val"), ValueError, "split"),
        (dict(mean=(0.1, 0.2)), ValueError, "mean/std"),
        (dict(std=(0.0,)), ValueError, "std"),
    ],
)
def test_image_dataset_validation(change, exc, match):
    kwargs = dict(images=torch.zeros(3, 1, 2, 2), labels=torch.tensor([0, 1, 2]), classes=["a", "b", "c"],
                  name="x", split="train")
    kwargs.update(change)
    with pytest.raises(exc, match=match):
        ImageDataset(**kwargs)


# --------------------------------------------------------------------------------------------
# stratified_subset


def class_counts(labels: torch.Tensor, idx: torch.Tensor) -> list[int]:
    values = torch.unique(labels)
    return [int((labels[idx] == v).sum()) for v in values]


@pytest.mark.parametrize(
    "counts, n, expected",
    [
        ([50, 30, 20], 10, [5, 3, 2]),  # exact quotas
        # quotas 3.5, 1.0, 0.5: floors 3, 1, 0; the spare one to the 0.5 tie's smaller label -> 4, 1, 0;
        # class 2 is then raised to 1, taken from class 0 (furthest above quota) -> 3, 1, 1
        ([7, 2, 1], 5, [3, 1, 1]),
        ([6, 3, 1], 4, [2, 1, 1]),  # quotas 2.4, 1.2, 0.4: largest remainder 0.4 -> class 2
        ([5, 3, 2], 2, [1, 1, 0]),  # n < classes: quotas 1.0, 0.6, 0.4, no minimum of one
        ([1, 1, 8], 3, [1, 1, 1]),  # quotas .3 .3 2.4 -> 0, 0, 3, then both small classes raised
        ([3, 3, 4], 5, [2, 1, 2]),  # quotas 1.5, 1.5, 2.0: the spare one to the tie's smaller label
        # quotas 2.0, 1.67, 0.33 -> 2, 2, 0; class 2 takes its one from class 1 (0.33 above quota),
        # not class 0 (at its quota)
        ([6, 5, 1], 4, [2, 1, 1]),
    ],
)
def test_stratified_subset_hand_computed(counts, n, expected):
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]  # interleaved
    idx = stratified_subset(labels, n, seed=3)
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == n
    assert class_counts(labels, idx) == expected


def test_stratified_subset_random_cases_within_one_of_quota():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        labels = torch.randint(0, 7, (int(torch.randint(50, 400, (1,), generator=gen)),), generator=gen) * 3 - 5
        n = int(torch.randint(30, len(labels), (1,), generator=gen))
        idx = stratified_subset(labels, n, seed=0)
        _, counts = torch.unique(labels, return_counts=True)
        quota = counts.double() * n / len(labels)
        got = torch.tensor(class_counts(labels, idx), dtype=torch.float64)
        assert got.sum() == n and bool(((got - quota).abs() < 1).all()), (got, quota)


def test_stratified_subset_deterministic_and_seeded():
    labels = torch.arange(300) % 4
    a, b = stratified_subset(labels, 40, seed=5), stratified_subset(labels, 40, seed=5)
    c = stratified_subset(labels, 40, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert class_counts(labels, c) == [10, 10, 10, 10]
    assert torch.equal(stratified_subset(labels.tolist(), 40, seed=5), a)  # a list of ints works too


def test_stratified_subset_all_and_errors():
    labels = torch.tensor([0, 1, 1, 2])
    assert torch.equal(stratified_subset(labels, 4), torch.arange(4))
    assert torch.equal(stratified_subset(labels, 100), torch.arange(4))
    with pytest.raises(ValueError, match="n: expected a positive"):
        stratified_subset(labels, 0)
    with pytest.raises(TypeError, match="n: expected a positive int"):
        stratified_subset(labels, 2.0)
    with pytest.raises(TypeError, match="labels: expected integer"):
        stratified_subset(labels.float(), 2)
    with pytest.raises(ValueError, match="labels: expected a 1-D"):
        stratified_subset(labels.view(2, 2), 2)
    with pytest.raises(ValueError, match="at least one label"):
        stratified_subset(torch.zeros(0, dtype=torch.int64), 2)


# --------------------------------------------------------------------------------------------
# make_loader


def epochs(loader, count: int = 2) -> list[list[torch.Tensor]]:
    return [[x[:, 0, 0, 0].long() for x, _ in loader] for _ in range(count)]


def test_loader_same_seed_same_batches_other_seed_differs():
    ds = small_dataset(37)
    a = epochs(make_loader(ds, batch_size=8, shuffle=True, seed=1))
    b = epochs(make_loader(ds, batch_size=8, shuffle=True, seed=1))
    c = epochs(make_loader(ds, batch_size=8, shuffle=True, seed=2))
    flat = lambda e: torch.cat(e).tolist()  # noqa: E731
    assert [flat(e) for e in a] == [flat(e) for e in b]
    assert flat(a[0]) != flat(c[0])
    assert flat(a[0]) != flat(a[1])  # each epoch draws a new order
    for epoch in a + c:
        assert sorted(flat(epoch)) == list(range(37))  # a permutation: every sample once
        assert [len(t) for t in epoch] == [8, 8, 8, 8, 5]


def test_loader_batches_are_the_dataset_rows_and_leave_global_rng_alone():
    ds = small_dataset(20)
    state = torch.random.get_rng_state()
    for images, labels in make_loader(ds, batch_size=6, shuffle=True, seed=0):
        idx = images[:, 0, 0, 0].long()
        assert torch.equal(images, ds.images[idx]) and torch.equal(labels, ds.labels[idx])
    assert torch.equal(torch.random.get_rng_state(), state)


def test_loader_sequential_and_drop_last():
    ds = small_dataset(10)
    batches = [x[:, 0, 0, 0].long().tolist() for x, _ in make_loader(ds, batch_size=4)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropped = [len(x) for x, _ in make_loader(ds, batch_size=4, shuffle=True, drop_last=True)]
    assert dropped == [4, 4]


def test_loader_generic_dataset_deterministic():
    ds = TensorDataset(torch.arange(30).float(), torch.arange(30))
    run = lambda seed: [y.tolist() for _, y in make_loader(ds, batch_size=7, shuffle=True, seed=seed)]  # noqa: E731
    assert run(4) == run(4) and run(4) != run(5)


def test_loader_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(small_dataset(), batch_size=0)
    with pytest.raises(TypeError, match="seed"):
        make_loader(small_dataset(), seed=1.5)


# ----------------------------------------------------------------------------------------------
# held_out_images: what a run did not train on


def test_held_out_images_are_the_rest_of_the_training_subset_stratified():
    labels = torch.arange(600) % 3  # 200 per class
    full = ImageDataset(torch.arange(600, dtype=torch.float32).view(600, 1, 1, 1), labels, ["a", "b", "c"],
                        "digits", "train")  # each image's one pixel is its index
    train, _ = data.training_subset(full, 450, seed=4)
    held = data.held_out_images(full, 450, 60, subset_seed=4)
    trained = set(train.images.flatten().long().tolist())
    picked = held.images.flatten().long().tolist()
    assert len(picked) == 60 and len(set(picked)) == 60 and not trained & set(picked)
    assert torch.equal(held.labels, labels[torch.tensor(picked)])
    assert class_counts(held.labels, torch.arange(60)) == [20, 20, 20]
    # more asked than left (the default, HELD_OUT_SIZE, too): all 150 that are left
    assert data.HELD_OUT_SIZE == 2_000 and len(data.held_out_images(full, 450, subset_seed=4)) == 150
    rest = data.held_out_images(full, 450, 10_000, subset_seed=4)
    assert set(rest.images.flatten().long().tolist()) == set(range(600)) - trained
    # another subset seed leaves other images; no subset, or one that took everything, leaves none
    assert set(data.held_out_images(full, 450, 150, subset_seed=5).images.flatten().long().tolist()) != set(picked)
    assert data.held_out_images(full, None, 60) is None and data.held_out_images(full, 600, 60) is None
    assert data.held_out_images(full, 598, 60) is None  # 2 left: fewer than one per class
