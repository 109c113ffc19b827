"""The public entry points given what users get wrong: a model whose output is NaN, a model on
another device than the data, images of the wrong size or channels, labels out of range. Each
answers with one clear error that names the problem, before any file is written.

Truth: the fault planted in the test (a NaN head, a model moved to ``meta``, 3-channel images for a
1-channel model, a label 15 for 10 classes).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import i2x
from i2x.data import ImageDataset

CLASSES = [str(c) for c in range(10)]


class NaNHead(nn.Module):
    """The wrapped model's logits, multiplied by NaN: a model that diverged."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * float("nan")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return i2x.build_model("small-resnet", 10, in_channels=1, widths=(8, 16, 32))[0].eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, 28, 28, generator=g), torch.tensor([0, 1, 2, 3])


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def test_explain(model, batch):
    x, y = batch
    explainer = i2x.Explainer(model, "layer3")
    with pytest.raises(ValueError) as e:
        i2x.Explainer(NaNHead(model), "inner.layer3").explain(x, targets=y)
    assert "NaN or inf for 4 of the 4 images" in _one_line(e)
    meta = i2x.build_model("small-resnet", 10, in_channels=1, widths=(8, 16, 32))[0].to("meta")
    with pytest.raises(ValueError) as e:
        i2x.Explainer(meta, "layer3").explain(x)
    assert "x is on cpu but the model is on meta" in _one_line(e)
    with pytest.raises(ValueError) as e:
        explainer.explain(torch.randn(4, 3, 28, 28))
    assert "cannot take a torch.float32 tensor of shape [4, 3, 28, 28]" in _one_line(e) and "channels" in str(e.value)
    with pytest.raises(ValueError) as e:
        explainer.explain(x, targets=torch.tensor([0, 1, 2, 15]))
    assert "[0, 10)" in _one_line(e) and "15" in str(e.value)


def test_explain_from(model, batch):
    x, y = batch
    explainer = i2x.Explainer(NaNHead(model), "inner.layer3")
    with explainer.capture() as captured:
        logits = explainer.model(x)
    with pytest.raises(ValueError) as e:
        explainer.explain_from(captured, logits, y)
    assert "NaN or inf" in _one_line(e)


def test_tracker(model, batch, tmp_path):
    x, y = batch
    with pytest.raises(ValueError) as e:
        tracker = i2x.Tracker(model, "layer3", i2x.Probe(torch.randn(4, 3, 28, 28), y, CLASSES), tmp_path / "a",
                              schedule=[1])
        tracker.step(1)
    assert "probe images: the model cannot take" in _one_line(e)
    assert i2x.store.RunStore.open(tmp_path / "a").finished_steps() == []  # nothing recorded
    tracker = i2x.Tracker(NaNHead(model), "inner.layer3", i2x.Probe(x, y, CLASSES), tmp_path / "b", schedule=[1],
                          recalibrate_bn=0)
    with pytest.raises(ValueError) as e:
        tracker.step(1)
    assert "NaN or inf" in _one_line(e)
    assert not list((tmp_path / "b").glob("checkpoints/*.safetensors"))
    with pytest.raises(ValueError) as e:
        i2x.Probe(x, torch.tensor([0, 1, 2, 15]), CLASSES)
    assert "[0, 9]" in _one_line(e) and "15" in str(e.value)


def test_train_and_evaluate(model, batch):
    x, _ = batch
    out_of_range = ImageDataset(x, torch.tensor([0, 1, 2, 15]), [str(c) for c in range(20)], "custom", "train")
    net = i2x.build_model("small-resnet", 10, in_channels=1, widths=(8, 16, 32))[0]
    before = {k: v.clone() for k, v in net.named_parameters()}
    with pytest.raises(ValueError) as e:
        i2x.train(net, out_of_range, 1)
    assert "the model has 10 outputs but the data hold labels from 0 to 15" in _one_line(e)
    assert all(torch.equal(before[k], v) for k, v in net.named_parameters())  # no optimiser step was taken
    good = ImageDataset(x, torch.tensor([0, 1, 2, 3]), CLASSES, "custom", "test")
    with pytest.raises(ValueError) as e:
        i2x.evaluate(NaNHead(model), good)
    assert "NaN or inf" in _one_line(e)
    with pytest.raises(ValueError) as e:
        i2x.evaluate(model, ImageDataset(torch.randn(4, 3, 28, 28), torch.tensor([0, 1, 2, 3]), CLASSES, "custom",
                                         "test"))
    assert "channels" in _one_line(e)


def _meta_model():
    return i2x.build_model("small-resnet", 10, in_channels=1, widths=(8, 16, 32))[0].to("meta")


def _split_model():
    net = i2x.build_model("small-resnet", 10, in_channels=1, widths=(8, 16, 32))[0]
    net.fc.to("meta")  # the head elsewhere than the body: what a half-finished .to() leaves
    return net


def _entry_points(tmp_path, batch):
    """Each public entry point that runs a model on data it reads itself, as ``model -> call``."""
    x, y = batch
    data = ImageDataset(x, y, CLASSES, "custom", "train")
    probe = i2x.Probe(x, y, CLASSES)
    return {
        "Tracker.step": lambda net: i2x.Tracker(net, "layer3", probe, tmp_path / "run", schedule=[1]).step(1),
        "track_checkpoints": lambda net: i2x.track_checkpoints(net, "layer3", probe, [(1, tmp_path / "w.pt")],
                                                               tmp_path / "post"),
        "train": lambda net: i2x.train(net, data, 1),
        "finetune": lambda net: i2x.finetune(net, data, 1),
        "evaluate": lambda net: i2x.evaluate(net, data),
        "discover_prototypes": lambda net: i2x.discover_prototypes(net, "layer3", x),
    }


@pytest.mark.parametrize("entry", ["Tracker.step", "track_checkpoints", "train", "finetune", "evaluate",
                                   "discover_prototypes"])
def test_a_model_away_from_the_data_gets_one_clear_error(entry, model, batch, tmp_path):
    torch.save(model.state_dict(), tmp_path / "w.pt")
    call = _entry_points(tmp_path, batch)[entry]
    with pytest.raises(ValueError) as e:
        call(_meta_model())
    assert "on the meta device" in _one_line(e)
    with pytest.raises(ValueError) as e:
        call(_split_model())
    assert "several devices (cpu, meta)" in _one_line(e)
    assert not list(tmp_path.glob("*/checkpoints/*.safetensors"))  # nothing recorded


@pytest.mark.parametrize("entry", ["train", "evaluate", "discover_prototypes"])
def test_a_device_the_model_is_not_on_gets_one_clear_error(entry, batch):
    x, y = batch
    net = i2x.build_model("small-resnet", 10, in_channels=1, widths=(8, 16, 32))[0]
    data = ImageDataset(x, y, CLASSES, "custom", "train")
    call = {"train": lambda: i2x.train(net, data, 1, device="meta"),
            "evaluate": lambda: i2x.evaluate(net, data, device="meta"),
            "discover_prototypes": lambda: i2x.discover_prototypes(net, "layer3", x, device="meta")}[entry]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError) as e:
        call()
    assert "device='meta' but the model is on cpu" in _one_line(e)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError) as e:
        i2x.evaluate(net, data, device="warp-drive")
    assert "not a torch device" in _one_line(e)
