"""Probes from any map-style torch Dataset, read a batch at a time through a DataLoader.

Truths: the run the same probe writes when its images are held as a tensor (checkpoints and
prototypes must be bit-identical), counts of what the dataset was asked for, torchvision's own
datasets.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

import i2x
from i2x.store import RunStore
from i2x.track.streamed import StreamedImages

CLASSES = [str(c) for c in range(10)]


class Counting(Dataset):
    """A dataset that counts its item reads (and refuses to be indexed with anything but an int)."""

    def __init__(self, images, labels):
        self.images, self.targets, self.reads = images, labels.tolist(), 0

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        assert isinstance(i, int)
        self.reads += 1
        return self.images[i], self.targets[i]


@pytest.fixture(scope="module")
def digits():
    return i2x.load_dataset("digits")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return i2x.build_model("small-resnet", 10, in_channels=1, widths=(8, 16, 32))[0].eval()


def _track(model, probe, folder):
    shutil.rmtree(folder, ignore_errors=True)
    tracker = i2x.Tracker(model, "layer3", probe, folder, schedule=[1, 2], recalibrate_bn=64, batch_size=64)
    tracker.step(1)
    tracker.finish(2, prototypes={"n_prototypes": 4, "pca_dim": 8})
    return RunStore.open(folder)


def test_a_tensor_dataset_probe_writes_the_same_run_as_the_held_images(digits, model, tmp_path):
    held = i2x.Probe.from_dataset(digits, size=150)
    streamed = i2x.Probe.from_dataset(TensorDataset(digits.images, digits.labels), size=150, classes=digits.classes)
    assert isinstance(streamed.images, StreamedImages) and streamed.images.shape == held.images.shape
    assert torch.equal(streamed.indices, held.indices) and torch.equal(streamed.labels, held.labels)
    a, b = _track(model, held, tmp_path / "held"), _track(model, streamed, tmp_path / "streamed")
    for step in (1, 2):
        for key in ("saliency", "probs"):
            assert torch.equal(a.load_checkpoint(step)[key], b.load_checkpoint(step)[key]), (step, key)
    pa, pb = a.read_tensors("prototypes"), b.read_tensors("prototypes")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert b.manifest["dataset"]["name"] == "TensorDataset"


def test_the_dataset_is_read_a_batch_at_a_time_and_once_per_pass(digits, model, tmp_path):
    data = Counting(digits.images, digits.labels)
    probe = i2x.Probe.from_dataset(data, size=120)
    assert probe.classes == CLASSES and data.reads == 1  # labels from .targets; one image read for its shape
    tracker = i2x.Tracker(model, "layer3", probe, tmp_path / "run", schedule=[1], recalibrate_bn=32, batch_size=50)
    before = data.reads
    tracker.step(1)
    # One record: one image to size the recalibration's batch (once per tracker), the 32
    # calibration images, then the 120 probe images, each read once.
    assert data.reads - before == 1 + 32 + 120
    again = data.reads
    tracker.record(2)
    assert data.reads - again == 32 + 120  # the batch size is not measured again
    assert RunStore.open(tmp_path / "run").finished_steps() == [1, 2]


def test_a_subset_of_a_dataset_and_workers(digits, model, tmp_path):
    base = TensorDataset(digits.images, digits.labels)
    subset = Subset(base, list(range(0, len(base), 3)))
    probe = i2x.Probe.from_dataset(subset, size=60, num_workers=2)
    expected_labels = digits.labels[torch.arange(0, len(base), 3)][probe.indices]
    assert torch.equal(probe.labels, expected_labels)  # indices are positions in the Subset
    held = i2x.Probe(digits.images[torch.arange(0, len(base), 3)][probe.indices], probe.labels, probe.classes,
                     probe.indices)
    a = _track(model, held, tmp_path / "held")
    b = _track(model, probe, tmp_path / "workers")
    assert torch.equal(a.load_checkpoint(2)["saliency"], b.load_checkpoint(2)["saliency"])


def test_a_torchvision_dataset(model, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    fake = torchvision.datasets.FakeData(size=40, image_size=(1, 28, 28), num_classes=10,
                                         transform=torchvision.transforms.ToTensor())
    probe = i2x.Probe.from_dataset(fake, size=20)
    tracker = i2x.Tracker(model, "layer3", probe, tmp_path / "fake", schedule=[1], recalibrate_bn=0)
    tracker.step(1)
    store = RunStore.open(tmp_path / "fake")
    assert store.finished_steps() == [1] and store.probe_size == 20
    labels = torch.tensor([int(fake[int(i)][1]) for i in probe.indices])
    assert torch.equal(store.probe()[1], labels)


def test_items_that_are_not_tensors_or_differ_in_shape(model, tmp_path):
    class Pictures(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return "a picture", i % 2

    with pytest.raises(TypeError, match="ToTensor"):
        i2x.Tracker(model, "layer3", i2x.Probe.from_dataset(Pictures()), tmp_path / "a", schedule=[1])

    class Ragged(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(1, 28 + 4 * (i % 2), 28), i % 2

    tracker = i2x.Tracker(model, "layer3", i2x.Probe.from_dataset(Ragged()), tmp_path / "b", schedule=[1],
                          recalibrate_bn=0)
    with pytest.raises(ValueError, match="different shapes"):
        tracker.step(1)


@pytest.mark.parametrize("source", ["tensor", "streamed"])
def test_the_heap_is_trimmed_after_each_large_batch_only(source, monkeypatch):
    """Large batches (224 px) ask the trimmer after use (it trims once the resident size grew:
    test below); small ones (28 px) do not ask."""
    import i2x.track.streamed as streamed

    calls = []
    monkeypatch.setattr(streamed, "GrowthTrimmer", lambda: (lambda: calls.append(1)))
    monkeypatch.setattr(streamed, "TRIM_BATCH_BYTES", 3 * 16 * 16 * 4 * 4)  # a batch of 4 images at 16 px
    images = torch.randn(10, 3, 16, 16)
    view = images if source == "tensor" else StreamedImages(TensorDataset(images, torch.zeros(10)), range(10))
    seen = []
    for start, batch in streamed.iter_batches(view, 4):  # 4 + 4 + 2 images: two large batches, one small
        seen.append(len(calls))  # not trimmed before the batch has been used
        assert torch.equal(batch, images[start:start + batch.shape[0]])
    assert seen == [0, 1, 2] and len(calls) == 2
    calls.clear()
    list(streamed.batches_at(i2x.data.ImageDataset(images, torch.zeros(10, dtype=torch.long), ["a"], "custom",
                                                   "train"), torch.arange(10), 4))
    assert len(calls) == 2


def test_release_freed_heap_runs_here():
    from i2x._internal.heap import glibc_malloc_trim, release_freed_heap

    release_freed_heap()  # glibc: malloc_trim(0); elsewhere a no-op
    import platform
    if platform.libc_ver()[0] == "glibc":
        assert glibc_malloc_trim() is not None


def test_the_heap_is_trimmed_only_once_the_resident_size_has_grown():
    """GrowthTrimmer by hand: the baseline is the lowest reading (taken between batches, never
    right after a trim); a trim happens only above baseline + margin; growth still there right
    after a trim becomes the baseline; an unreadable size trims every time."""
    from i2x._internal.heap import GrowthTrimmer

    readings = iter([100, 90, 150, 161, 120, 130, 161, 162, 170, 232, 240])
    trims = []
    trimmer = GrowthTrimmer(margin=70, read=lambda: next(readings), trim=lambda: trims.append(1))
    trimmer()  # 100: the baseline
    trimmer()  # 90: lower, the new baseline
    trimmer()  # 150: within the margin
    assert trims == [] and trimmer.baseline == 90
    trimmer()  # 161 > 160: trim (no reading after it)
    assert trims == [1] and trimmer.baseline == 90
    trimmer()  # 120: back within the margin
    trimmer()  # 130
    trimmer()  # 161: trim again
    assert len(trims) == 2
    trimmer()  # 162 right after a trim: the trim could not return it, so it is the new baseline
    assert len(trims) == 2 and trimmer.baseline == 162
    trimmer()  # 170
    trimmer()  # 232 = 162 + 70: at the margin, not above it
    assert len(trims) == 2
    trimmer()  # 240: trim
    assert len(trims) == 3 and trimmer.trims == 3
    blind = GrowthTrimmer(read=lambda: None, trim=lambda: trims.append(1))
    blind()
    blind()
    assert len(trims) == 5 and blind.trims == 2
