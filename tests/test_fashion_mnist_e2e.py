"""End to end on real data: a short Fashion-MNIST training run tracked online, prototypes from the
final model, the analysis, and "why does it look there" for one probe sample.

Needs the Fashion-MNIST files (Debian's ``dataset-fashion-mnist`` at
``/usr/share/datasets/fashion-mnist``, or ``$I2X_DATA``): skipped without them, except under
``CI`` where a missing dataset is a failure (CI must run this test).

Truths, none of them read back through the code under test alone:
- the schedule: ``log_schedule`` of the planned steps plus the final step, computed here;
- every stored checkpoint file read with ``safetensors`` directly (not through ``RunStore``);
- the final checkpoint against a plain-torch GradCAM (forward hook + ``autograd.grad`` on a copy
  of the final model in eval mode, its BatchNorm statistics recomputed on the probe images as the
  tracker documents) and softmax;
- the prototype assignment against a plain nearest-centroid search over the final model's
  ``layer3`` features (its own BatchNorm statistics) projected with the stored mean and components;
- the probe's recorded dataset indices against the images of the full training split;
- explain_sample's positions against a numpy ordering of the stored final grid.
"""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import i2x
from i2x.data import make_loader, stratified_subset

TRAIN_SIZE = 2000
PROBE_SIZE = 300
BATCH = 64
EPOCHS = 2
N_CHECKPOINTS = 6
N_PROTOTYPES = 8
WIDTHS = (8, 16, 32)
GRID = (7, 7)  # layer3 of SmallResNet at 28 px
TOP = 5
# The tracker recomputes BatchNorm statistics on min(512, N) probe images, in batches of 256.
RECALIBRATE_BN = 512
CALIBRATION_BATCH = 256


@pytest.fixture(scope="module")
def train_set():
    try:
        return i2x.load_dataset("fashion-mnist")
    except FileNotFoundError as e:
        reason = ("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist puts it in "
                  f"/usr/share/datasets/fashion-mnist, or set I2X_DATA):\n{e}")
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so this end-to-end test must run. {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def run(train_set, tmp_path_factory):
    """Train, track, fit prototypes, analyse; returns what the tests need to check it."""
    started = time.perf_counter()
    subset_idx = stratified_subset(train_set.labels, TRAIN_SIZE, seed=0)
    subset = train_set.subset(subset_idx)
    drawn = i2x.Probe.from_dataset(subset, size=PROBE_SIZE, seed=0)
    # Record the probe's positions in the full training split, not in the subset.
    probe = i2x.Probe(drawn.images, drawn.labels, drawn.classes, subset_idx[drawn.indices],
                      {**drawn.dataset, "train_subset": TRAIN_SIZE})

    torch.manual_seed(0)
    model, layer = i2x.build_model("small-resnet", num_classes=10, widths=WIDTHS)
    loader = make_loader(subset, batch_size=BATCH, shuffle=True, seed=0)
    planned = EPOCHS * len(loader)
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    tracker = i2x.Tracker(model, layer, probe, run_dir, planned_steps=planned, n_checkpoints=N_CHECKPOINTS)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    step = 0
    for _ in range(EPOCHS):
        for x, y in loader:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            step += 1
            tracker.step(step)
    store = tracker.finish(step, prototypes={"n_prototypes": N_PROTOTYPES})
    assert store is tracker.store
    tracked = time.perf_counter()
    analysis = i2x.analyze(run_dir)
    explanation = i2x.explain_sample(run_dir, 0, top=TOP)
    finished = time.perf_counter()
    print(f"\ne2e: train+track+prototypes {tracked - started:.1f} s, analysis+explain {finished - tracked:.2f} s")
    return {
        "dir": run_dir, "store": store, "model": model, "layer": layer, "probe": probe, "planned": planned,
        "final_step": step, "analysis": analysis, "explanation": explanation, "train": train_set,
    }


def _manifest(run) -> dict:
    return json.loads((run["dir"] / "manifest.json").read_text())


def _checkpoint(run, entry) -> dict[str, torch.Tensor]:
    return load_file(str(run["dir"] / entry["file"]))


def _accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels).double().mean())


def _final_entry(run) -> dict:
    finals = [c for c in _manifest(run)["checkpoints"] if c["final"]]
    assert len(finals) == 1, finals
    return finals[0]


def _eval_copy(model, calibration=None):
    """A copy of ``model`` in eval mode; with ``calibration`` images, its BatchNorm running
    statistics are first set to the sample-weighted mean of the per-batch statistics over batches
    of ``CALIBRATION_BATCH`` (each layer's input taken with train-mode normalisation upstream), as
    the tracker documents for its records."""
    m = copy.deepcopy(model)
    if calibration is not None:
        norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
        sums = {bn: [] for bn in norms}
        hooks = [bn.register_forward_hook(lambda mod, i, o: sums[mod].append(
            (i[0].shape[0], i[0].mean((0, 2, 3)), i[0].var((0, 2, 3), unbiased=True)))) for bn in norms]
        m.eval()
        for bn in norms:
            bn.momentum = 0.0  # batch statistics normalise; the running ones stay as they are
            bn.train()
        with torch.no_grad():
            for batch in calibration.split(CALIBRATION_BATCH):
                m(batch)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for bn in norms:
                total = sum(n for n, _, _ in sums[bn])
                bn.running_mean.copy_(sum(n * mean for n, mean, _ in sums[bn]) / total)
                bn.running_var.copy_(sum(n * var for n, _, var in sums[bn]) / total)
    return m.eval()


def _reference_gradcam(model, layer, images, labels):
    """Plain GradCAM of the true class (forward hook + autograd.grad down to the layer):
    ``([N, h, w], softmax [N, M])``."""
    captured = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda mod, i, o: captured.__setitem__("a", o))
    try:
        logits = model(images)
    finally:
        handle.remove()
    a = captured["a"]
    grads = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), a)[0]
    grid = F.relu((grads.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1))
    return grid.detach(), F.softmax(logits.detach(), dim=1)


# ----------------------------------------------------------------------------------------------


def test_manifest_lists_the_scheduled_checkpoints_and_the_final_one(run):
    schedule = i2x.log_schedule(run["planned"], N_CHECKPOINTS)
    expected = sorted(set(schedule) | {run["final_step"]})
    manifest = _manifest(run)
    assert manifest["format"] == "i2x-run" and manifest["format_version"] == 1
    assert manifest["schedule"] == {"kind": "log", "planned_steps": run["planned"], "n_checkpoints": N_CHECKPOINTS,
                                    "first_step": schedule[0], "steps": schedule}
    steps = [c["step"] for c in manifest["checkpoints"]]
    assert steps == expected, f"manifest lists {steps}, the schedule {schedule} + final {run['final_step']}"
    assert _final_entry(run)["step"] == run["final_step"]
    assert manifest["grid"] == list(GRID)
    # "build": how to rebuild the model (i2x.build_model made it), for i2x curate / experiment.
    assert manifest["model"] == {"name": "SmallResNet", "layer": "layer3", "method": "gradcam",
                                 "build": {"name": "small-resnet", "num_classes": 10, "in_channels": 1,
                                           "options": {"widths": list(WIDTHS)}}}
    assert manifest["probe"]["size"] == PROBE_SIZE
    assert set(manifest["stages"]) == {"prototypes", "analysis"}
    for entry in manifest["checkpoints"]:
        assert (run["dir"] / entry["file"]).is_file()


def test_probe_accuracy_rises_well_above_chance(run):
    labels = run["probe"].labels
    entries = _manifest(run)["checkpoints"]
    first = _accuracy(_checkpoint(run, entries[0])["probs"], labels)
    final = _accuracy(_checkpoint(run, _final_entry(run))["probs"], labels)
    print(f"\nprobe accuracy: first checkpoint (step {entries[0]['step']}) {first:.3f}, final {final:.3f}")
    assert final > 0.5, f"final probe accuracy {final:.3f}: the model did not learn"
    assert final > first + 0.1, f"probe accuracy did not rise: first {first:.3f}, final {final:.3f}"


def test_saliency_grids_are_7x7_raw_and_not_all_zero(run):
    for entry in _manifest(run)["checkpoints"]:
        tensors = _checkpoint(run, entry)
        sal, probs = tensors["saliency"], tensors["probs"]
        assert sal.dtype == torch.float16 and tuple(sal.shape) == (PROBE_SIZE, *GRID), entry
        assert probs.dtype == torch.float32 and tuple(probs.shape) == (PROBE_SIZE, 10), entry
        assert bool((sal >= 0).all()), f"step {entry['step']}: GradCAM is a ReLU, got negative values"
        nonzero = (sal.flatten(1) > 0).any(dim=1).double().mean()
        assert nonzero > 0.5, f"step {entry['step']}: only {float(nonzero):.2f} of the grids are not all zero"
        torch.testing.assert_close(probs.sum(1), torch.ones(PROBE_SIZE), rtol=0, atol=1e-5)


def test_final_checkpoint_matches_a_plain_gradcam_of_the_final_model(run):
    probe = run["probe"]
    # min(512, 300): the stratified calibration subset is the whole probe set, in order.
    assert _manifest(run)["options"]["recalibrate_bn"] == min(RECALIBRATE_BN, PROBE_SIZE)
    model = _eval_copy(run["model"], calibration=probe.images)
    ref_grid, ref_probs = _reference_gradcam(model, run["layer"], probe.images, probe.labels)
    stored = _checkpoint(run, _final_entry(run))
    torch.testing.assert_close(stored["probs"], ref_probs, rtol=1e-4, atol=1e-5)
    # Stored as float16: about 3 significant digits.
    torch.testing.assert_close(stored["saliency"].float(), ref_grid, rtol=2e-3, atol=1e-3 * float(ref_grid.max()))
    # The model's own running statistics were put back after the record.
    _, own_probs = _reference_gradcam(_eval_copy(run["model"]), run["layer"], probe.images, probe.labels)
    assert not torch.allclose(own_probs, ref_probs, atol=1e-3), "recalibration had no effect: the check is vacuous"
    with torch.no_grad():
        live = F.softmax(copy.deepcopy(run["model"]).eval()(probe.images), dim=1)
    torch.testing.assert_close(live, own_probs, rtol=0, atol=0)


def test_probe_records_positions_in_the_full_training_split(run):
    indices = load_file(str(run["dir"] / "probe.safetensors"))["indices"]
    assert torch.equal(indices, run["probe"].indices)
    assert torch.equal(run["train"].images[indices], run["probe"].images)
    assert torch.equal(run["train"].labels[indices], run["probe"].labels)
    # Stratified: 30 of each class.
    assert torch.bincount(run["probe"].labels, minlength=10).tolist() == [PROBE_SIZE // 10] * 10


def test_prototypes_cover_the_probe_and_match_a_nearest_centroid_search(run):
    tensors = load_file(str(run["dir"] / "prototypes.safetensors"))
    assignment = tensors["assignment"]
    assert assignment.dtype == torch.int64 and tuple(assignment.shape) == (PROBE_SIZE, *GRID)
    counts = torch.bincount(assignment.flatten(), minlength=N_PROTOTYPES)
    assert counts.numel() == N_PROTOTYPES and int(counts.min()) >= 1, f"prototype usage {counts.tolist()}"
    assert tuple(tensors["centroids"].shape) == (N_PROTOTYPES, WIDTHS[-1])  # pca_dim 64 clipped to C = 32

    # Prototypes are fitted on the final model with the same recalibrated BatchNorm statistics as
    # the records (so the assignment and the final saliency describe one model).
    model = _eval_copy(run["model"], calibration=run["probe"].images)
    captured = {}
    handle = model.layer3.register_forward_hook(lambda mod, i, o: captured.__setitem__("a", o))
    with torch.no_grad():
        model(run["probe"].images)
    handle.remove()
    rows = captured["a"].double().permute(0, 2, 3, 1).reshape(-1, WIDTHS[-1])
    projected = (rows - tensors["mean"].double()) @ tensors["components"].double()
    dist = torch.cdist(projected, tensors["centroids"].double()) ** 2
    nearest = dist.argmin(dim=1).reshape(PROBE_SIZE, *GRID)
    # A position nearly equidistant from two centroids may go either way in float32.
    sorted_dist = dist.sort(dim=1).values
    clear = (sorted_dist[:, 1] - sorted_dist[:, 0] > 1e-4 * sorted_dist[:, 1].clamp(min=1)).reshape(nearest.shape)
    assert float(clear.double().mean()) > 0.99
    assert torch.equal(assignment[clear], nearest[clear])


def test_analysis_has_every_pair_and_the_transitions(run):
    data = json.loads((run["dir"] / "analysis.json").read_text())
    steps = [c["step"] for c in _manifest(run)["checkpoints"]]
    assert data["steps"] == steps
    assert data["transitions"] == [[steps[i], steps[i + 1]] for i in range(len(steps) - 1)]
    pairs = sorted(tuple(e["pair"]) for e in data["timeline"])
    assert pairs == [(a, b) for a in range(10) for b in range(a + 1, 10)]
    assert len(data["uncertainty"]) == 3
    assert data["num_prototypes"] == N_PROTOTYPES and data["grid"] == list(GRID)
    beta = run["analysis"].beta_pooled
    assert tuple(beta.shape) == (len(steps) - 1, N_PROTOTYPES, 10)
    assert bool(torch.isfinite(beta).all()) and bool((beta != 0).any())
    again = i2x.load_analysis(run["dir"])
    assert again.data == run["analysis"].data
    assert torch.equal(again.beta_pooled, beta)


def test_explain_sample_points_at_the_top_positions_of_the_final_grid(run):
    explanation = run["explanation"]
    final = _final_entry(run)
    grid = _checkpoint(run, final)["saliency"][0].float().numpy().ravel()
    # Highest first, ties in row-major order.
    order = np.lexsort((np.arange(grid.size), -grid))[:TOP]
    expected = [(int(j) // GRID[1], int(j) % GRID[1]) for j in order]
    got = [(p["row"], p["col"]) for p in explanation.positions]
    assert got == expected
    assert [p["saliency"] for p in explanation.positions] == pytest.approx(grid[order].tolist())
    assignment = load_file(str(run["dir"] / "prototypes.safetensors"))["assignment"][0]
    assert [p["prototype"] for p in explanation.positions] == [int(assignment[r, c]) for r, c in expected]
    assert explanation.step == final["step"]
    assert explanation.true_class == int(run["probe"].labels[0])
    assert explanation.dataset_index == int(run["probe"].indices[0])
    assert [e.prototype for e in explanation.prototypes] == list(dict.fromkeys(p["prototype"] for p in explanation.positions))
    assert "probe sample 0" in str(explanation)
