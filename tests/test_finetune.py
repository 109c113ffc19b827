"""The training loop (i2x.loop.training) against independent truths.

Truths: bit-identical weights from two runs of the same recipe; the positions a recording dataset
was asked for, against ``epoch_permutation`` / the order / the sampler given; accuracy and
confusion counted by hand from a plain forward; BatchNorm statistics computed by hand on the
calibration images.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset

import i2x
from i2x.loop.penalty import ExplanationPenalty
from i2x.loop.strategies import OversampleSampler, epoch_permutation
from i2x.data import ImageDataset
from i2x.loop.training import fit, resolve_precision

from _loop import hand_targets, image_dataset, snapshot, state_equal, tiny_net

CPU = torch.device("cpu")


@pytest.fixture
def data() -> ImageDataset:
    return image_dataset(96, 3, seed=0, signal=1.0)


class Recording(Dataset):
    """Wraps a dataset and records every position it is asked for (read item by item)."""

    def __init__(self, inner):
        self.inner = inner
        self.seen: list[int] = []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.inner[int(i)]


# ----------------------------------------------------------------------------------------------
# Determinism, layout, modes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_finetune_is_deterministic_on_the_cpu(data, precision):
    if precision == "bf16" and resolve_precision("auto", CPU) != "bf16":
        pytest.skip("this CPU has no native bfloat16 (auto resolves to fp32)")
    start = tiny_net(seed=1)
    before = snapshot(start)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(start)
        stats = i2x.finetune(model, data, epochs=2, lr=0.05, batch_size=32, seed=3, precision=precision)
        assert stats.precision == precision and stats.steps == 2 * 3 and stats.samples == 2 * 96
        runs.append(snapshot(model))
    assert state_equal(runs[0], runs[1]), f"two {precision} runs from the same weights and seed differ"
    assert not state_equal(runs[0], before), "fine-tuning changed nothing"
    other = copy.deepcopy(start)
    i2x.finetune(other, data, epochs=2, lr=0.05, batch_size=32, seed=4, precision=precision)
    assert not state_equal(snapshot(other), runs[0]), "another seed gave the same weights"
    if precision == "bf16":
        fp32 = copy.deepcopy(start)
        i2x.finetune(fp32, data, epochs=2, lr=0.05, batch_size=32, seed=3, precision="fp32")
        assert not state_equal(snapshot(fp32), runs[0]), "bf16 gave the fp32 weights: autocast had no effect"


def test_layout_and_modes_are_restored(data):
    model = tiny_net(seed=0)
    model.eval()
    model.bn.train()  # mixed modes
    modes = [m.training for m in model.modules()]
    during = []

    def on_step(step):
        during.append((model.layer.weight.is_contiguous(memory_format=torch.channels_last),
                       model.layer.weight.is_contiguous(), model.training, model.fc.training))

    stats = fit(model, data, 1, 0.01, batch_size=48, on_step=on_step, precision="fp32", channels_last=True)
    assert stats.channels_last
    assert during == [(True, False, True, True)] * 2  # channels-last and train mode while training
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(b.is_contiguous() for b in model.buffers())
    assert [m.training for m in model.modules()] == modes
    # A model that was channels-last stays so; channels_last=False never converts.
    cl = tiny_net(seed=0).to(memory_format=torch.channels_last)
    i2x.finetune(cl, data, epochs=1, lr=0.01, precision="fp32", channels_last=True)
    assert cl.layer.weight.is_contiguous(memory_format=torch.channels_last)
    # The defaults: channels-last on the CPU only under bfloat16 (float32 stays NCHW: see fit).
    assert not i2x.finetune(tiny_net(seed=0), data, epochs=1, lr=0.01, precision="fp32").channels_last
    assert i2x.finetune(tiny_net(seed=0), data, epochs=1, lr=0.01, precision="bf16").channels_last
    plain = tiny_net(seed=0)
    stats = i2x.finetune(plain, data, epochs=1, lr=0.01, precision="fp32", channels_last=False)
    assert not stats.channels_last and plain.layer.weight.is_contiguous()


def test_modes_are_restored_after_an_error(data):
    model = tiny_net(seed=0)
    model.eval()
    images = data.images.clone()
    images[50] = float("nan")
    bad = ImageDataset(images, data.labels, data.classes, data.name, data.split)
    with pytest.raises(FloatingPointError, match="NaN"):
        i2x.finetune(model, bad, epochs=1, lr=0.01, batch_size=32, precision="fp32", seed=0)
    assert not any(m.training for m in model.modules())
    assert all(p.is_contiguous() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Which samples, in which order


def test_default_order_is_epoch_permutation(data):
    rec = Recording(data)
    i2x.finetune(tiny_net(), rec, epochs=3, lr=0.01, batch_size=40, seed=5, precision="fp32")
    expected = torch.cat([epoch_permutation(len(data), 5, e) for e in range(3)]).tolist()
    assert rec.seen == expected


def test_a_callable_order_sees_the_epoch_numbers(data):
    rec = Recording(data)
    seen_epochs = []

    def order(epoch):
        seen_epochs.append(epoch)
        return torch.arange(10 * epoch, 10 * epoch + 25)  # 25 positions, another window each epoch

    stats = i2x.finetune(tiny_net(), rec, epochs=3, lr=0.01, batch_size=10, order=order, precision="fp32")
    assert sorted(set(seen_epochs)) == [0, 1, 2] and seen_epochs[-3:] == [0, 1, 2]
    assert rec.seen == list(range(0, 25)) + list(range(10, 35)) + list(range(20, 45))
    assert stats.steps == 3 * 3 and stats.samples == 3 * 25


def test_a_fixed_order_is_used_every_epoch(data):
    rec = Recording(data)
    order = torch.tensor([7, 3, 3, 90, 0])
    stats = i2x.finetune(tiny_net(), rec, epochs=2, lr=0.01, batch_size=2, order=order, precision="fp32")
    assert rec.seen == order.tolist() * 2
    assert stats.steps == 2 * 3 and stats.samples == 10


def test_a_sampler_is_asked_each_epoch(data):
    rec = Recording(data)
    sampler = OversampleSampler(len(data), torch.tensor([1, 2, 3]), extra=5, seed=2)
    stats = i2x.finetune(tiny_net(), rec, epochs=2, lr=0.01, batch_size=50, sampler=sampler, precision="fp32")
    expected = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected += sampler.order().tolist()
    assert rec.seen == expected
    assert stats.samples == 2 * (len(data) + 5) and stats.steps == 2 * 3


def test_the_penalty_sees_dataset_positions_through_a_subset(data):
    class RecordingPenalty(ExplanationPenalty):
        def forward(self, captured, logits, labels, indices):
            self.seen.append(torch.as_tensor(indices).clone())
            return super().forward(captured, logits, labels, indices)

    model = tiny_net(seed=2)
    targets = hand_targets(data, pair=(0, 1), seed=0, n_targets=(5, 5), grid=(8, 8))  # the layer keeps 8 x 8
    penalty = RecordingPenalty(i2x.Explainer(model, "layer"), targets, weight=1.0)
    penalty.seen = []
    kept = [i for i in range(len(data)) if i % 4 != 1]
    sub = Subset(data, kept)
    stats = i2x.finetune(model, sub, epochs=1, lr=0.01, batch_size=24, seed=0, penalty=penalty, precision="fp32")
    seen = torch.cat(penalty.seen)
    expected = torch.tensor(kept)[epoch_permutation(len(kept), 0, 0)]
    assert torch.equal(seen, expected)
    assert stats.mean_penalty > 0


# ----------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_against_a_hand_count():
    data = image_dataset(30, 3, seed=4, signal=0.5)
    model = tiny_net(seed=3, bn=False)
    model.train()
    with torch.no_grad():
        preds = model(data.images).argmax(1).tolist()
    labels = data.labels.tolist()
    m = 4  # one class more than the data has: its row stays empty
    confusion = [[0] * m for _ in range(m)]
    for t, p in zip(labels, preds):
        confusion[t][p] += 1
    correct = sum(t == p for t, p in zip(labels, preds))
    per_class = [confusion[c][c] / sum(confusion[c]) if sum(confusion[c]) else 0.0 for c in range(m)]
    got = i2x.evaluate(model, data, batch_size=7, num_classes=m)
    assert got["confusion"] == confusion
    assert got["accuracy"] == pytest.approx(correct / len(labels), abs=1e-12)
    assert got["per_class"] == pytest.approx(per_class, abs=1e-12)
    assert got["n"] == 30
    assert 0 < correct < 30 and len(set(preds)) > 1  # not a degenerate check
    assert model.training  # modes put back
    # Without num_classes: as many as the largest label or prediction.
    assert len(i2x.evaluate(model, data)["confusion"]) == max(max(labels), max(preds)) + 1


def test_evaluate_recalibrates_batchnorm_and_puts_the_statistics_back():
    data = image_dataset(60, 3, seed=1, signal=1.0)
    model = tiny_net(seed=5)
    i2x.finetune(model, data, epochs=8, lr=0.05, batch_size=20, precision="fp32")  # a model that has learned
    with torch.no_grad():  # running statistics away from the data's
        model.bn.running_mean.add_(torch.randn(4, generator=torch.Generator().manual_seed(0)))
        model.bn.running_var.mul_(3.0)
        model.bn.num_batches_tracked.fill_(17)
    model.bn.momentum = 0.3
    before = snapshot(model)
    calibration = data.images[:40]
    got = i2x.evaluate(model, data, calibration=calibration, num_classes=3)
    assert state_equal(snapshot(model), before), "evaluate changed the model's own BatchNorm statistics"
    assert model.bn.momentum == 0.3
    # By hand: one calibration batch, so the statistics are its mean and unbiased variance.
    with torch.no_grad():
        h = model.conv(calibration)
        ref = copy.deepcopy(model).eval()
        ref.bn.running_mean.copy_(h.mean(dim=(0, 2, 3)))
        ref.bn.running_var.copy_(h.var(dim=(0, 2, 3), unbiased=True))
        preds = ref(data.images).argmax(1)
    confusion = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in zip(data.labels.tolist(), preds.tolist()):
        confusion[t, p] += 1
    assert got["confusion"] == confusion.tolist()
    assert got["accuracy"] > 0.5
    own = i2x.evaluate(model, data, num_classes=3)
    assert own["confusion"] != got["confusion"], "recalibration had no effect: the check is vacuous"


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_refused_clearly(data):
    model = tiny_net()
    empty = ImageDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64), data.classes, "custom", "train")
    with pytest.raises(ValueError, match="the dataset is empty"):
        i2x.finetune(model, empty, lr=0.01)
    with pytest.raises(ValueError, match="evaluation set is empty"):
        i2x.evaluate(model, empty)
    for lr in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr: expected a positive finite number"):
            i2x.finetune(model, data, lr=lr)
    with pytest.raises(ValueError, match="train_lr"):
        i2x.finetune(model, data, train_lr=0)
    with pytest.raises(ValueError, match="epochs"):
        i2x.finetune(model, data, epochs=0, lr=0.01)
    with pytest.raises(ValueError, match="precision"):
        i2x.finetune(model, data, lr=0.01, precision="fp16")
    loader = DataLoader(data, batch_size=16)
    targets = hand_targets(data, grid=(8, 8))
    penalty = ExplanationPenalty(i2x.Explainer(model, "layer"), targets)
    with pytest.raises(ValueError, match="pass the Dataset, not a DataLoader"):
        i2x.finetune(model, loader, lr=0.01, penalty=penalty)
    with pytest.raises(ValueError, match="give the sampler to the DataLoader"):
        i2x.finetune(model, loader, lr=0.01, sampler=OversampleSampler(len(data), torch.tensor([0]), 1))
    with pytest.raises(TypeError, match="model"):
        i2x.finetune("model", data, lr=0.01)
    before = snapshot(model)
    assert state_equal(snapshot(model), before)


def test_a_nan_in_the_data_raises_floating_point_error(data):
    images = data.images.clone()
    images[10, 0, 3, 3] = float("nan")
    bad = ImageDataset(images, data.labels, data.classes, data.name, data.split)
    with pytest.raises(FloatingPointError, match="check the data for NaN"):
        i2x.finetune(tiny_net(), bad, epochs=1, lr=0.01, batch_size=96, precision="fp32")


def test_a_dataloader_is_accepted(data):
    model = tiny_net(seed=0)
    loader = DataLoader(data, batch_size=32, shuffle=False)
    stats = i2x.finetune(model, loader, epochs=2, lr=0.01, precision="fp32")
    assert stats.steps == 6 and stats.samples == 192
