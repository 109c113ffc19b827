"""Default batch sizes from a memory budget (i2x._internal.memory, i2x.explain.batching).

The truths: bytes of tensors computed by hand; the batch a known cost and budget give, worked out
here; and the process's own peak resident memory (VmHWM) while a record runs, in a subprocess,
against the budget it was given.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from i2x._internal.memory import (
    DEFAULT_MEMORY_BUDGET_MIB,
    MAX_AUTO_BATCH,
    SCRATCH_FLOOR_MIB,
    SCRATCH_SHARE,
    auto_batch_size,
    check_memory_budget,
    peak_tensor_bytes,
)

MIB = 2**20


def test_peak_tensor_bytes_counts_what_is_alive_at_once():
    def fn():
        a = torch.empty(1000)            # 4,000 bytes
        b = torch.empty(500)             # + 2,000 = 6,000 alive
        del a                            # 2,000
        c = torch.empty(250, dtype=torch.float64)  # + 2,000 = 4,000
        return b, c

    assert peak_tensor_bytes(fn) == 6000


def test_peak_tensor_bytes_ignores_views_and_in_place_ops():
    def fn():
        a = torch.zeros(1000)
        a.add_(1)                        # same storage
        v = a[10:20]                     # a view: no new storage
        return v.sum()                   # a 0-d result: 4 bytes

    assert peak_tensor_bytes(fn) == 4004


def test_auto_batch_size_matches_the_hand_computed_fit():
    image = torch.zeros(1, 64, 64)       # 16 KiB
    per_tensor = 8 * image.numel() * 4   # step makes eight copies of each image
    step = lambda x: x.repeat(1, 8, 1, 1)  # noqa: E731
    budget = 64.0
    usable = (budget - SCRATCH_FLOOR_MIB) * MIB
    per_image = per_tensor * (1 + SCRATCH_SHARE) + image.numel() * 4 * (1 + 2)
    expected = math.floor(usable / per_image)
    assert auto_batch_size(step, image, budget, in_flight=2) == expected
    # A reserve comes off the budget; a batch never goes below 1 or above the cap.
    reserve = 20 * MIB
    assert auto_batch_size(step, image, budget, in_flight=2, reserve_bytes=reserve) == math.floor(
        (usable - reserve) / per_image)
    assert auto_batch_size(step, image, SCRATCH_FLOOR_MIB + 0.1) == 1
    assert auto_batch_size(lambda x: x * 2, torch.zeros(1, 4, 4), 1024.0) == MAX_AUTO_BATCH


def test_a_pass_that_cannot_be_measured_is_sized_from_its_input_with_a_warning():
    calls = []

    def step(x):  # runs plainly, but not under the counting mode (as some compiled models)
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("not under a dispatch mode")

    with pytest.warns(RuntimeWarning, match="could not measure"):
        batch = auto_batch_size(step, torch.zeros(3, 224, 224), 256.0)
    per_image = 32 * 3 * 224 * 224 * 4 * (1 + SCRATCH_SHARE) + 3 * 224 * 224 * 4 * 2
    assert batch == math.floor((256 - SCRATCH_FLOOR_MIB) * MIB / per_image)


def test_the_pass_own_error_is_raised_as_it_is():
    def step(x):
        raise ValueError("layer has 24 channels but the run's prototypes were fitted on 32")

    with pytest.raises(ValueError, match="24 channels"):
        auto_batch_size(step, torch.zeros(3, 8, 8), 256.0)


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-5, ValueError), (float("nan"), ValueError),
                                       (float("inf"), ValueError), ("256", TypeError), (True, TypeError)])
def test_a_bad_budget_is_refused_naming_it(bad, error):
    with pytest.raises(error, match="memory_budget"):
        check_memory_budget(bad)
    assert check_memory_budget(None) == DEFAULT_MEMORY_BUDGET_MIB


def test_small_images_batch_as_before():
    """A 28 px probe on the small ResNet fits 256 images in the default budget: the old default."""
    import i2x

    model, layer = i2x.build_model("small-resnet", 10, in_channels=1)
    tracker_images = torch.randn(300, 1, 28, 28)
    from i2x.explain.batching import explain_batch_size, forward_batch_size

    explainer = i2x.Explainer(model, layer)
    assert explain_batch_size(explainer, tracker_images) == 256
    assert forward_batch_size(model, tracker_images) == 256


def test_the_batch_grows_with_the_budget_and_shrinks_with_the_image():
    import i2x
    from i2x.explain.batching import explain_batch_size

    model, layer = i2x.build_model("small-resnet", 10, in_channels=3)
    explainer = i2x.Explainer(model, layer)
    image = torch.randn(3, 96, 96)
    small = explain_batch_size(explainer, image, 64)
    large = explain_batch_size(explainer, image, 256)
    bigger_images = explain_batch_size(explainer, torch.randn(3, 192, 192), 256)

    # The fit by hand from the bytes of one and two images' explain calls and the weights' size.
    def step(x):
        explainer.explain(x, targets=0, size=None, normalize=False, return_logits=True)

    model.eval()
    one, two = image[None], torch.stack([image, image])  # made outside the count: the inputs are the loader's
    step(one)  # warm-up, as the sizing does: first-call allocations are not per image
    single, double = peak_tensor_bytes(lambda: step(one)), peak_tensor_bytes(lambda: step(two))
    per_image = (double - single) * (1 + SCRATCH_SHARE) + image.numel() * 4 * 2  # the batch and one in flight
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    fixed = max(single - (double - single), 0)
    for budget, got in ((64, small), (256, large)):
        assert got == math.floor(((budget - SCRATCH_FLOOR_MIB) * MIB - weights - fixed) / per_image), budget
    # the two budgets give different, unclipped batches (else the fit above would not be tested)
    assert small > 1 and large > small and large < MAX_AUTO_BATCH, (small, large)
    assert bigger_images < large
    # Four times the pixels: about a quarter of the images (the reserve is the same).
    assert large / bigger_images == pytest.approx(4, rel=0.35)


def test_the_tracker_records_its_chosen_batch_and_takes_a_given_one(tmp_path):
    import i2x
    from i2x.explain.batching import explain_batch_size

    model, layer = i2x.build_model("small-resnet", 3, in_channels=3)
    images, labels = torch.randn(40, 3, 64, 64), torch.arange(40) % 3
    auto = i2x.Tracker(model, layer, (images, labels), tmp_path / "auto", schedule=[1], memory_budget=32)
    given = i2x.Tracker(model, layer, (images, labels), tmp_path / "given", schedule=[1], batch_size=7)
    assert given.batch_size == 7
    # A probe held as a tensor has no batch in flight besides the one explained.
    assert auto.batch_size == explain_batch_size(i2x.Explainer(model, layer), images, 32, in_flight=0) > 1
    assert auto.store.manifest["options"]["batch_size"] is None
    assert auto.store.manifest["options"]["memory_budget"] == 32
    with pytest.raises(ValueError, match="memory_budget"):
        i2x.Tracker(model, layer, (images, labels), tmp_path / "bad", schedule=[1], memory_budget=0)


def test_the_recalibration_batch_follows_the_budget_and_its_statistics_match_a_reference(tmp_path):
    """224 px-like images do not fit 256 to a train-mode forward in a small budget: the recalibration
    runs as many as an eval forward fits, and its statistics are the sample-weighted means of the
    per-batch statistics at that batch (computed here by hand, batch by batch)."""
    import i2x
    from i2x.explain.batching import forward_batch_size
    from i2x.track.batchnorm import CALIBRATION_BATCH, recalibrated_batchnorm

    torch.manual_seed(0)
    model, layer = i2x.build_model("small-resnet", 3, in_channels=3)
    images, labels = torch.randn(60, 3, 64, 64), torch.arange(60) % 3
    tracker = i2x.Tracker(model, layer, (images, labels), tmp_path / "run", schedule=[1], memory_budget=24,
                          recalibrate_bn=60)
    expected = min(CALIBRATION_BATCH, forward_batch_size(model, images, 24))
    assert tracker.calibration_batch == expected
    assert 1 < expected < 60, expected  # several batches of the 60 images: the weighting below matters
    assert i2x.Tracker(model, layer, (images, labels), tmp_path / "none", schedule=[1],
                       recalibrate_bn=0).calibration_batch is None

    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    handle = bn.register_forward_hook(lambda mod, i, o: seen.append(i[0].detach().clone()))
    with recalibrated_batchnorm(model, tracker.calibration, "cpu", tracker.calibration_batch):
        got_mean, got_var = bn.running_mean.clone(), bn.running_var.clone()
    handle.remove()
    calibration_seen = seen[-len(range(0, 60, expected)):]  # the sizing's own forwards came first
    assert [x.shape[0] for x in calibration_seen] == [len(r) for r in torch.arange(60).split(expected)]
    weights = torch.tensor([x.shape[0] / 60 for x in calibration_seen])
    mean = sum(w * x.mean((0, 2, 3)) for w, x in zip(weights, calibration_seen, strict=True))
    var = sum(w * x.var((0, 2, 3), unbiased=True) for w, x in zip(weights, calibration_seen, strict=True))
    torch.testing.assert_close(got_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_var, var, rtol=1e-4, atol=1e-5)


def test_evaluate_with_a_default_batch_gives_the_same_numbers(tmp_path):
    import i2x
    from i2x.loop.training import evaluate

    model, _ = i2x.build_model("small-resnet", 4, in_channels=1)
    data = i2x.data.ImageDataset(torch.randn(70, 1, 28, 28), torch.arange(70) % 4, list("abcd"), "custom", "test")
    assert evaluate(model, data, batch_size=7) == evaluate(model, data)


_RECORD = textwrap.dedent("""
    import json, sys, torch, torchvision
    import i2x
    from i2x.apps.bench import cpu_memory_check, cpu_peak_growth
    from i2x.track.tracker import record_checkpoint
    from i2x.explain.batching import explain_batch_size
    torch.manual_seed(0)
    torch.set_num_threads(2)
    budget, size = float(sys.argv[1]), int(sys.argv[2])
    works, how = cpu_memory_check()
    model = torchvision.models.resnet18(num_classes=10).eval()
    explainer = i2x.Explainer(model, "layer4")
    batch = explain_batch_size(explainer, torch.randn(3, size, size), budget)
    images = torch.randn(2 * batch, 3, size, size)
    labels = torch.zeros(2 * batch, dtype=torch.long)
    record_checkpoint(explainer, images[:batch], labels[:batch], batch_size=batch)  # the backend's first-use setup
    growth = cpu_peak_growth(lambda: record_checkpoint(explainer, images, labels, memory_budget=budget))
    print(json.dumps({"works": works, "how": how, "batch": batch, "growth_mib": growth / 2**20}))
""")


@pytest.mark.parametrize("budget,size", [(128, 112), (256, 160)])
def test_a_record_stays_within_its_budget(budget, size):
    """The resident memory one record of a default-batched probe takes, measured in a fresh process,
    stays within 25% of the budget, and uses a fair part of it (the batch is not just 1)."""
    pytest.importorskip("torchvision")
    out = subprocess.run([sys.executable, "-P", "-c", _RECORD, str(budget), str(size)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not r["works"]:
        pytest.skip(r["how"])
    assert r["batch"] > 4
    assert r["growth_mib"] <= 1.25 * budget, r
    assert r["growth_mib"] >= 0.3 * budget, r


@pytest.mark.parametrize("verb", [["train", "RUN", "--data", "digits"], ["demo", "RUN"],
                                  ["track", "--run", "RUN", "--checkpoints", ".", "--dataset", "digits",
                                   "--model", "small-resnet"]])
def test_the_command_line_refuses_a_bad_budget_before_any_work(verb, tmp_path):
    args = [str(tmp_path / "run") if a == "RUN" else a for a in verb]
    done = subprocess.run([sys.executable, "-P", "-m", "i2x", *args, "--memory-budget", "nan"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "--memory-budget" in done.stderr
    assert not (tmp_path / "run").exists()
