"""Stage 9, second half (i2x.loop.experiments) against independent truths.

Truths: scipy's t quantile for the paired intervals; every cell of a tiny experiment recomputed
here with the public pieces (``finetune`` from a copy of the start weights, the strategies'
orders from ``epoch_permutation`` / ``Targets``, ``evaluate``), which also proves that every arm
of a seed starts from the same weights; a second, uninterrupted run in another folder for the
resume checks; and the summary recomputed from the cells.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import statistics

import numpy as np
import pytest
import torch
from scipy import stats as sps

import i2x
from i2x.loop.strategies import epoch_permutation
from i2x._internal.hashing import state_digest
from i2x.loop.experiments import load_results, paired_interval, results_markdown, summarize
from i2x.loop.training import calibration_images
from i2x.store import RunStore

from _loop import hand_model_targets, hand_targets, image_dataset, snapshot, state_equal, tiny_net

ARMS = ["full", "full->full", "curated->full", "random->full", "hard->full"]
SEEDS = 2
SETTINGS = dict(epochs_per_stage=1, lr=0.02, batch_size=64, precision="fp32")
PAIR = (0, 2)  # the pair the tiny model confuses (class 2, a faint checkerboard, is taken for 0 or 1)


# ----------------------------------------------------------------------------------------------
# Statistics


def test_paired_interval_against_scipy():
    values = [1.0, -0.5, 2.0, 0.25]
    got = paired_interval(values)
    mean = float(np.mean(values))
    sd = float(np.std(values, ddof=1))
    half = float(sps.t.ppf(0.975, len(values) - 1)) * sd / math.sqrt(len(values))
    assert got["n"] == 4
    assert got["mean"] == pytest.approx(mean, rel=1e-12)
    assert got["std"] == pytest.approx(sd, rel=1e-12)
    assert got["lo"] == pytest.approx(mean - half, rel=1e-12)
    assert got["hi"] == pytest.approx(mean + half, rel=1e-12)
    assert got["excludes_zero"] is False  # [-0.85, 2.22]
    below = paired_interval([-1.0, -1.2, -0.9])
    t = float(sps.t.ppf(0.975, 2))
    assert below["hi"] == pytest.approx(-31 / 30 + t * float(np.std([-1.0, -1.2, -0.9], ddof=1)) / math.sqrt(3))
    assert below["hi"] < 0 and below["excludes_zero"] is True
    assert paired_interval([2, 2, 2]) == {"mean": 2.0, "std": 0.0, "lo": 2.0, "hi": 2.0, "n": 3, "excludes_zero": True}


def test_paired_interval_one_and_no_values():
    assert paired_interval([0.5]) == {"mean": 0.5, "std": None, "lo": None, "hi": None, "n": 1, "excludes_zero": False}
    with pytest.raises(ValueError, match="no values"):
        paired_interval([])


# ----------------------------------------------------------------------------------------------
# A tiny experiment: 3 classes of faint 8 x 8 patterns, 240 training and 90 test images, a
# 300-parameter net, targets by hand (8 + 8 of the pair (0, 2)), 5 arms x 2 seeds, one epoch per stage.


@pytest.fixture(scope="module")
def setup():
    train = image_dataset(240, 3, seed=0, signal=0.3)
    test = image_dataset(90, 3, seed=1, signal=0.3, split="test")
    model = tiny_net(seed=0)
    i2x.finetune(model, train, epochs=4, lr=0.05, batch_size=32, precision="fp32")  # the "final model"
    targets = hand_targets(train, pair=PAIR, seed=0, n_targets=(8, 8))
    return {"train": train, "test": test, "model": model, "targets": targets}


def _new_run(path, train) -> RunStore:
    return RunStore.create(path, model={"name": "TinyNet", "layer": "layer", "method": "gradcam"},
                           dataset={"name": "custom"}, classes=train.classes, probe_indices=torch.arange(30),
                           probe_labels=train.labels[:30])


def _run(setup, run_dir, log=None, targets=None, **overrides):
    return i2x.experiment(run_dir, setup["model"], setup["train"], setup["test"], arms=ARMS, seeds=SEEDS,
                          targets=setup["targets"] if targets is None else targets, log=log,
                          **{**SETTINGS, **overrides})


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted experiment, and what was logged."""
    run_dir = tmp_path_factory.mktemp("experiment") / "run"
    _new_run(run_dir, setup["train"])
    before = snapshot(setup["model"])
    lines = []
    results = _run(setup, run_dir, log=lines.append)
    assert state_equal(snapshot(setup["model"]), before), "experiment changed the model it was given"
    return {"dir": run_dir, "results": results, "lines": lines}


def _cells(results) -> dict:
    """Every cell's numbers, without the timings."""
    return {(arm, seed): {k: v for k, v in cell.items() if k not in ("seconds", "fit")}
            for arm, entry in results["arms"].items() for seed, cell in entry["seeds"].items()}


def _logged_cells(lines) -> list[tuple[str, str]]:
    out = []
    for line in lines:
        m = re.match(r"(\S+) seed (\d+):", line)
        assert m, line
        out.append((m.group(1), m.group(2)))
    return out


def test_results_have_the_documented_layout(setup, reference):
    results = reference["results"]
    assert {"pair", "arms", "summary", "config", "start"} <= set(results)
    assert results["pair"] == list(PAIR) and results["schema"] == "i2x-experiment"
    a, b = PAIR
    assert list(results["arms"]) == ARMS
    on_disk = load_results(reference["dir"])
    assert on_disk == json.loads(json.dumps(results))
    assert (reference["dir"] / "experiment" / "results.md").read_text() == results_markdown(on_disk)
    for arm, entry in results["arms"].items():
        assert entry["stages"] == arm.split("->")
        assert sorted(entry["seeds"]) == ["0", "1"]
        for seed, cell in entry["seeds"].items():
            assert {"accuracy", "pair_confusions", "a_as_b", "b_as_a", "per_class", "confusion"} <= set(cell)
            conf = cell["confusion"]
            assert cell["a_as_b"] == conf[a][b] and cell["b_as_a"] == conf[b][a]
            assert cell["pair_confusions"] == conf[a][b] + conf[b][a]
            assert sum(map(sum, conf)) == len(setup["test"])
            assert cell["accuracy"] == pytest.approx(sum(conf[c][c] for c in range(3)) / len(setup["test"]))
    assert reference["results"]["config"]["seeds"] == [0, 1]
    assert sorted(_logged_cells(reference["lines"])) == sorted((a, str(s)) for a in ARMS for s in range(SEEDS))


def test_the_summary_is_the_cells_statistics(reference):
    results = reference["results"]
    arms = results["arms"]
    summary = copy.deepcopy(results["summary"])
    assert summarize(copy.deepcopy(results)) == summary
    for arm in ARMS:
        acc = [arms[arm]["seeds"][s]["accuracy"] for s in ("0", "1")]
        pc = [arms[arm]["seeds"][s]["pair_confusions"] for s in ("0", "1")]
        assert summary[arm]["accuracy_mean"] == pytest.approx(statistics.fmean(acc))
        assert summary[arm]["pair_confusions_mean"] == pytest.approx(statistics.fmean(pc))
        assert summary[arm]["pair_confusions_std"] == pytest.approx(statistics.stdev(pc))
    assert summary["full"]["comparisons"] == {}  # one stage: no one-stage reference was run
    assert summary["full->full"]["baseline_choice"] == "hard->full"
    for arm in ("curated->full", "random->full", "hard->full"):
        refs = {"full->full", "random->full", "hard->full"} - {arm}
        assert set(summary[arm]["comparisons"]) == refs
    comp = summary["curated->full"]["comparisons"]["full->full"]
    d = [arms["curated->full"]["seeds"][s]["pair_confusions"] - arms["full->full"]["seeds"][s]["pair_confusions"]
         for s in ("0", "1")]
    assert comp["pair_confusions"] == paired_interval(d)
    ref_mean = statistics.fmean(arms["full->full"]["seeds"][s]["pair_confusions"] for s in ("0", "1"))
    assert comp["relative_pair_confusions"] == (pytest.approx(statistics.fmean(d) / ref_mean) if ref_mean else None)
    da = [100 * (arms["curated->full"]["seeds"][s]["accuracy"] - arms["full->full"]["seeds"][s]["accuracy"])
          for s in ("0", "1")]
    assert comp["accuracy_points"]["mean"] == pytest.approx(statistics.fmean(da))


def test_every_cell_recomputed_from_the_start_weights(setup, reference):
    """Each arm of each seed, rebuilt here from a copy of the start weights with the strategies'
    public data objects and epoch_permutation's orders, gives the recorded numbers exactly: every
    arm of a seed started from the same weights and saw the orders the docs promise."""
    results = reference["results"]
    train, test, targets = setup["train"], setup["test"], setup["targets"]
    assert results["config"]["start_weights"] == state_digest(setup["model"].state_dict())
    n = len(train)
    calibration = calibration_images(train)
    common = dict(epochs=1, lr=SETTINGS["lr"], batch_size=SETTINGS["batch_size"], precision="fp32")

    def kept_order(keep: torch.Tensor, epoch: int) -> torch.Tensor:
        perm = epoch_permutation(n, seed, epoch)
        return perm[keep[perm]]

    for seed in range(SEEDS):
        keep_curated = torch.ones(n, dtype=torch.bool)
        keep_curated[targets.target_indices] = False
        keep_random = torch.zeros(n, dtype=torch.bool)
        keep_random[torch.as_tensor(targets.random_subset(train, seed=seed).indices)] = True
        first = {
            "full": dict(order=lambda e: epoch_permutation(n, seed, e)),
            "curated": dict(order=lambda e: kept_order(keep_curated, e)),
            "random": dict(order=lambda e: kept_order(keep_random, e)),
            "hard": dict(sampler=targets.hard_sampler(train, seed=seed)),
        }
        for arm in ARMS:
            model = copy.deepcopy(setup["model"])
            stages = arm.split("->")
            i2x.finetune(model, train, seed=seed, **common, **first[stages[0]])
            if len(stages) == 2:  # the second stage's epoch is 1: the order continues
                i2x.finetune(model, train, seed=seed, order=lambda e: epoch_permutation(n, seed, e + 1), **common)
            ev = i2x.evaluate(model, test, calibration, num_classes=3)
            cell = results["arms"][arm]["seeds"][str(seed)]
            assert ev["confusion"] == cell["confusion"], (arm, seed)
            assert ev["accuracy"] == cell["accuracy"], (arm, seed)
    # The arms and seeds are not all the same (the check would be vacuous if fine-tuning did nothing).
    assert len({json.dumps(c["confusion"]) for e in results["arms"].values() for c in e["seeds"].values()}) > 3
    assert len({c["pair_confusions"] for e in results["arms"].values() for c in e["seeds"].values()}) > 1


def test_running_it_again_gives_the_same_table(setup, reference, tmp_path):
    other = tmp_path / "run"
    _new_run(other, setup["train"])
    again = _run(setup, other)
    assert _cells(again) == _cells(reference["results"])
    assert again["summary"] == reference["results"]["summary"]
    assert (other / "experiment" / "results.md").read_text() == \
        (reference["dir"] / "experiment" / "results.md").read_text()
    # On a finished folder, nothing is recomputed.
    lines = []
    same = _run(setup, other, log=lines.append)
    assert lines == []
    assert _cells(same) == _cells(again)


def test_an_interrupted_experiment_resumes_to_the_same_table(setup, reference, tmp_path):
    run_dir = tmp_path / "run"
    _new_run(run_dir, setup["train"])
    first = []

    def stop_after_three(line):
        first.append(line)
        if len(first) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(setup, run_dir, log=stop_after_three)
    done = _logged_cells(first)
    on_disk = load_results(run_dir)
    assert sorted((a, s) for (a, s) in _cells(on_disk)) == sorted(done)  # the 3 finished cells were saved
    second = []
    resumed = _run(setup, run_dir, log=second.append)
    redone = _logged_cells(second)
    assert len(redone) == len(ARMS) * SEEDS - 3
    assert not set(redone) & set(done), f"finished cells were recomputed: {set(redone) & set(done)}"
    assert _cells(resumed) == _cells(reference["results"])
    assert resumed["summary"] == reference["results"]["summary"]
    assert (run_dir / "experiment" / "results.md").read_text() == \
        (reference["dir"] / "experiment" / "results.md").read_text()


def test_another_config_on_the_same_folder_is_refused(setup, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    before = (run_dir / "experiment" / "results.json").read_text()
    with pytest.raises(ValueError, match=r"\(lr differ\)"):
        _run(setup, run_dir, lr=0.03)
    with pytest.raises(ValueError, match=r"\(batch_size, epochs_per_stage differ\)"):
        _run(setup, run_dir, epochs_per_stage=2, batch_size=32)
    with pytest.raises(ValueError, match=r"\(targets differ\)"):
        _run(setup, run_dir, targets=hand_targets(setup["train"], pair=PAIR, seed=1, n_targets=(8, 8)))
    other = copy.deepcopy(setup["model"])
    with torch.no_grad():
        other.fc.bias.add_(1e-3)
    with pytest.raises(ValueError, match=r"\(start_weights differ\)"):
        i2x.experiment(run_dir, other, setup["train"], setup["test"], arms=ARMS, seeds=SEEDS,
                       targets=setup["targets"], **SETTINGS)
    assert (run_dir / "experiment" / "results.json").read_text() == before  # nothing was written
    # Another name is another experiment: allowed.
    lines = []
    res = i2x.experiment(run_dir, setup["model"], setup["train"], setup["test"], arms=["full"], seeds=1,
                         targets=setup["targets"], name="lr03", log=lines.append, **{**SETTINGS, "lr": 0.03})
    assert len(lines) == 1 and res["config"]["lr"] == 0.03


def test_bad_arms_and_seeds(setup, tmp_path):
    run_dir = tmp_path / "run"
    _new_run(run_dir, setup["train"])
    common = dict(targets=setup["targets"], **SETTINGS)
    with pytest.raises(ValueError, match="arm 'curated->nothing'"):
        i2x.experiment(run_dir, setup["model"], setup["train"], setup["test"], arms=["curated->nothing"], **common)
    with pytest.raises(ValueError, match="seeds"):
        i2x.experiment(run_dir, setup["model"], setup["train"], setup["test"], arms=["full"], seeds=[1, 1], **common)
    with pytest.raises(ValueError, match="oracle"):
        i2x.experiment(run_dir, setup["model"], setup["train"], setup["test"], arms=["oracle->full"], **common)
    with pytest.raises(ValueError, match="clean"):
        i2x.experiment(run_dir, setup["model"], setup["train"], setup["test"], arms=["clean"], **common)


# ----------------------------------------------------------------------------------------------
# Model scope: targets over every class, arms compared on the test errors


MODEL_ARMS = ["full", "full->full", "transplanted->full", "random->full"]


def test_a_model_scope_experiment_compares_arms_on_all_errors(setup, tmp_path):
    """Model-scope targets (every sample a row, some of every class selected): each cell's errors
    are the test images predicted wrongly, the transplanted cell is recomputed with the public
    pieces, the comparisons are paired intervals of the errors, and the report says so."""
    train, test = setup["train"], setup["test"]
    targets = hand_model_targets(train, seed=0, per_class=6)
    run_dir = tmp_path / "run"
    _new_run(run_dir, train)
    results = i2x.experiment(run_dir, setup["model"], train, test, arms=MODEL_ARMS, seeds=SEEDS, targets=targets,
                             scope="model", **SETTINGS)
    assert results["pair"] is None and results["config"]["scope"] == "model"
    for arm in MODEL_ARMS:
        for seed in ("0", "1"):
            cell = results["arms"][arm]["seeds"][seed]
            conf = cell["confusion"]
            assert cell["errors"] == len(test) - sum(conf[c][c] for c in range(3))
            assert cell["worst_class_accuracy"] == min(cell["per_class"])
            assert "pair_confusions" not in cell
    # transplanted->full, seed 1, rebuilt by hand from the start weights
    n, seed = len(train), 1
    model = copy.deepcopy(setup["model"])
    common = dict(epochs=1, lr=SETTINGS["lr"], batch_size=SETTINGS["batch_size"], precision="fp32", seed=seed)
    i2x.finetune(model, targets.transplanted(train, seed=seed), order=lambda e: epoch_permutation(n, seed, e),
                 **common)
    i2x.finetune(model, train, order=lambda e: epoch_permutation(n, seed, e + 1), **common)
    ev = i2x.evaluate(model, test, calibration_images(train), num_classes=3)
    assert ev["confusion"] == results["arms"]["transplanted->full"]["seeds"]["1"]["confusion"]
    arms = results["arms"]
    comp = results["summary"]["transplanted->full"]["comparisons"]["full->full"]
    d = [arms["transplanted->full"]["seeds"][s]["errors"] - arms["full->full"]["seeds"][s]["errors"] for s in ("0", "1")]
    assert comp["errors"] == paired_interval(d)
    text = (run_dir / "experiment" / "results.md").read_text()
    assert text.startswith("# Experiment: the whole model") and "| arm | reference | errors |" in text
    assert "worst class accuracy" in text


def test_the_scope_must_match_the_targets(setup, tmp_path):
    run_dir = tmp_path / "run"
    _new_run(run_dir, setup["train"])
    common = dict(arms=["full"], seeds=1, **SETTINGS)
    with pytest.raises(ValueError, match=r"scope='pair' \(--scope pair\): the targets are model-wide"):
        i2x.experiment(run_dir, setup["model"], setup["train"], setup["test"],
                       targets=hand_model_targets(setup["train"]), **common)
    with pytest.raises(ValueError, match=r"scope='model' \(--scope model\): the targets are a pair's \(\(0, 2\)\)"):
        i2x.experiment(run_dir, setup["model"], setup["train"], setup["test"], targets=setup["targets"],
                       scope="model", **common)
    with pytest.raises(ValueError, match="scope: expected 'pair' or 'model'"):
        i2x.experiment(run_dir, setup["model"], setup["train"], setup["test"], targets=setup["targets"],
                       scope="class", **common)
    assert not (run_dir / "experiment").exists()


# ----------------------------------------------------------------------------------------------
# The cleaned arm: the pair's likely mislabelled images (i2x labels) dropped


def _write_labels(run_dir, positions, pair=PAIR):
    entry = {"pair": list(pair), "names": ["c0", "c2"], "images": 160, "issues": len(positions),
             "issue_share": len(positions) / 160, "overlap": 0.01, "overlapping": len(positions),
             "issue_positions": positions, "exemplars": positions[:12], "shortcut_prototypes": [],
             "verdict": "overlap", "line": "c0 vs c2: by hand"}
    (run_dir / "labels.json").write_text(json.dumps({"schema": "i2x-labels", "schema_version": 1, "pairs": [entry]}))


def test_the_cleaned_arm_drops_the_diagnosed_images_and_is_recomputed_by_hand(setup, tmp_path):
    train, test = setup["train"], setup["test"]
    run_dir = tmp_path / "run"
    _new_run(run_dir, train)
    arms = ["full", "cleaned->full"]
    res = i2x.experiment(run_dir, setup["model"], train, test, arms=arms, seeds=1, targets=setup["targets"],
                         name="nolabels", **SETTINGS)
    assert "i2x labels RUN --data NAME" in res["arms"]["cleaned->full"]["skipped"]
    in_pair = ((train.labels == PAIR[0]) | (train.labels == PAIR[1])).nonzero().flatten()
    dropped = in_pair[::9].tolist()
    _write_labels(run_dir, dropped)
    res = i2x.experiment(run_dir, setup["model"], train, test, arms=arms, seeds=1, targets=setup["targets"],
                         **SETTINGS)
    assert res["config"]["cleaned"] is not None and "skipped" not in res["arms"]["cleaned->full"]
    n, seed = len(train), 0
    keep = torch.ones(n, dtype=torch.bool)
    keep[dropped] = False
    model = copy.deepcopy(setup["model"])
    common = dict(epochs=1, lr=SETTINGS["lr"], batch_size=SETTINGS["batch_size"], precision="fp32", seed=seed)
    i2x.finetune(model, train, order=lambda e: epoch_permutation(n, seed, e)[keep[epoch_permutation(n, seed, e)]],
                 **common)
    i2x.finetune(model, train, order=lambda e: epoch_permutation(n, seed, e + 1), **common)
    ev = i2x.evaluate(model, test, calibration_images(train), num_classes=3)
    assert ev["confusion"] == res["arms"]["cleaned->full"]["seeds"]["0"]["confusion"]
    # positions beyond the training set are refused, naming the file
    _write_labels(run_dir, [len(train) + 5])
    with pytest.raises(ValueError, match="labels.json: positions up to"):
        i2x.experiment(run_dir, setup["model"], train, test, arms=arms, seeds=1, targets=setup["targets"],
                       name="bad", **SETTINGS)


# ----------------------------------------------------------------------------------------------
# The recommendation: decided on held-out validation images, never on the test set


def _fake_results(validation: dict[str, list[int]], test: dict[str, list[int]]) -> dict:
    """Results with the given pair confusions per seed on validation and on test."""
    arms = {}
    for arm in validation:
        seeds = {}
        for s, (v, t) in enumerate(zip(validation[arm], test[arm], strict=True)):
            cell = {"accuracy": 0.9, "pair_confusions": t, "a_as_b": t, "b_as_a": 0,
                    "validation": {"accuracy": 0.9, "pair_confusions": v, "a_as_b": v, "b_as_a": 0}}
            seeds[str(s)] = cell
        arms[arm] = {"stages": arm.split("->"), "seeds": seeds}
    return {"config": {"validation_size": 500}, "arms": arms}


def test_the_recommendation_is_the_arm_that_beats_every_control_on_validation():
    from i2x.loop.experiments import recommendation

    controls = {"full->full": [20, 22, 21], "random->full": [21, 20, 22], "hard->full": [22, 21, 20]}
    val = {**controls, "curated->full": [10, 11, 12], "transplanted->full": [15, 14, 16],
           "oracle->full": [1, 1, 2]}
    # On the test set transplanted looks best: the recommendation must not look there.
    test = {**controls, "curated->full": [30, 30, 30], "transplanted->full": [5, 5, 5], "oracle->full": [0, 0, 0]}
    results = _fake_results(val, test)
    summarize(results)
    rec = results["recommendation"]
    assert rec["arm"] == "curated->full"  # both qualify; the oracle never does; the lowest validation wins
    assert rec == recommendation(results)
    comps = results["summary"]["curated->full"]["validation"]["comparisons"]
    assert set(comps) == {"full->full", "random->full", "hard->full"}
    assert comps["full->full"] == paired_interval([10 - 20, 11 - 22, 12 - 21])


def test_no_recommendation_when_nothing_beats_the_controls_or_nothing_was_held_out():
    from i2x.loop.experiments import recommendation

    controls = {"full->full": [20, 22, 21], "random->full": [21, 20, 22]}
    val = {**controls, "curated->full": [19, 23, 20]}  # not below every control
    results = _fake_results(val, val)
    summarize(results)
    assert results["recommendation"]["arm"] is None and "keep the model" in results["recommendation"]["reason"]
    no_val = _fake_results(val, val)
    for entry in no_val["arms"].values():
        for cell in entry["seeds"].values():
            del cell["validation"]
    summarize(no_val)
    assert recommendation(no_val)["arm"] is None and "no validation images" in recommendation(no_val)["reason"]


def test_an_arm_that_acts_in_both_stages_is_held_to_controls_that_act_in_both():
    from i2x.loop.experiments import control_arms

    assert control_arms("curated->curated", "random") == ("random->random", "random->full")
    assert control_arms("transplanted->full", "hard") == ("hard->full",)
    assert control_arms("curated", "random") == ("random",)
    assert control_arms("random->random", "random") == ("random->full",)  # never itself
    assert control_arms("full->full", "random") == ("random->full",)
    controls = {"full->full": [20, 22, 21], "random->full": [26, 27, 25], "hard->full": [24, 25, 26]}
    # curated->curated beats the ->full controls by far (its last stage also leaves the marked images
    # out) but not random->random, which does the same at random: that is the control it meets
    val = {**controls, "random->random": [15, 16, 15], "hard->hard": [18, 18, 19], "curated->curated": [15, 15, 16],
           "curated->full": [19, 21, 20]}
    results = _fake_results(val, val)
    summary = summarize(results)
    assert set(summary["curated->curated"]["comparisons"]) == {"full->full", "random->random", "hard->hard"}
    assert summary["curated->curated"]["validation"]["comparisons"]["random->random"] == paired_interval([0, -1, 1])
    assert set(summary["curated->full"]["comparisons"]) == {"full->full", "random->full", "hard->full"}
    assert results["recommendation"]["arm"] == "curated->full"  # below all three of its own controls
    # without the matched controls in the experiment, the ->full ones stand in
    alone = _fake_results({k: v for k, v in val.items() if k not in ("random->random", "hard->hard")},
                          {k: v for k, v in val.items() if k not in ("random->random", "hard->hard")})
    assert set(summarize(alone)["curated->curated"]["comparisons"]) == {"full->full", "random->full", "hard->full"}
    assert alone["recommendation"]["arm"] == "curated->curated"


def _with_copies(val: dict, moved: dict) -> dict:
    """Fake pair results with plain validation ``val`` and counterfactual copies ``moved`` per seed."""
    results = _fake_results(val, val)
    for arm, entry in results["arms"].items():
        for s, cell in entry["seeds"].items():
            v = moved[arm][int(s)]
            cell["counterfactual"] = {"accuracy": 0.5, "pair_confusions": v, "a_as_b": v, "b_as_a": 0}
    results["config"].update(counterfactual_size=40, epochs_per_stage=1, lr=0.01, batch_size=32, precision="fp32",
                             test_size=100, seeds=[0, 1, 2])
    results["pair"] = [0, 1]
    summarize(results)
    return results


def test_with_counterfactual_copies_an_arm_must_also_beat_full_full_on_the_plain_images():
    from i2x.loop.experiments import recommendation

    controls = {"full->full": [20, 22, 21], "random->full": [21, 20, 22]}
    # transplanted wins the copies by most but makes more plain validation errors than full->full
    # (+3, +2, +2): the copies reward the arm that trains on pasted regions whatever they are, so it
    # is refused. curated wins both (-2, -2, -1 on the plain images: interval below 0).
    val = {**controls, "transplanted->full": [23, 24, 23], "curated->full": [18, 20, 20]}
    moved = {**controls, "transplanted->full": [5, 6, 4], "curated->full": [10, 11, 9]}
    results = _with_copies(val, moved)
    rec = results["recommendation"]
    # Summed per seed: curated [28, 31, 29] against full->full [40, 44, 42] and random->full
    # [42, 40, 44]: below both; transplanted [28, 30, 27] is lower but refused.
    assert rec["arm"] == "curated->full" and rec["decided_on"] == "decision", rec
    entry = results["summary"]["curated->full"]["decision"]
    assert entry["comparisons"]["full->full"] == paired_interval([28 - 40, 31 - 44, 29 - 42])
    assert rec["refused"] == {"transplanted->full": paired_interval([3, 2, 2])}
    assert "held-out (validation + counterfactual)" in rec["reason"] and rec == recommendation(results)
    assert "and 40 counterfactual copies of them" in results_markdown(results)
    # curated no better on the plain images on average (+1, -1, 0): refused too, the model is kept
    even = _with_copies({**val, "curated->full": [21, 21, 21]}, moved)["recommendation"]
    assert even["arm"] is None and set(even["refused"]) == {"transplanted->full", "curated->full"}
    assert even["refused"]["curated->full"] == paired_interval([1, -1, 0])
    assert even["reason"].startswith("transplanted->full (+2.3 [") and "] * against full->full)" in even["reason"]
    assert even["reason"].endswith("keep the model")
    # fewer on average but not beyond noise (-1, -1, 0): refused as well
    noisy = _with_copies({**val, "curated->full": [19, 21, 21]}, moved)["recommendation"]
    assert noisy["arm"] is None and "curated->full" in noisy["refused"]
    # a one-stage arm is held to full on the plain images: curated [18, 20, 20] against full [20, 22, 21]
    one = _with_copies({**val, "full": [20, 22, 21], "curated": [18, 20, 20]},
                       {**moved, "full": [20, 22, 21], "curated": [10, 11, 9]})["recommendation"]
    assert one["arm"] in ("curated", "curated->full") and "curated" not in one["refused"], one
    # without the copies the plain validation alone decides, with nothing refused for it
    results = _fake_results(val, val)
    summarize(results)
    assert results["recommendation"]["arm"] is None and results["recommendation"]["refused"] == {}


def test_an_experiment_evaluates_every_cell_on_the_counterfactual_copies(setup, tmp_path):
    train, test = setup["train"], setup["test"]
    validation = image_dataset(90, 3, seed=2, signal=0.3)
    held = hand_targets(validation, pair=(0, 2), seed=1, n_targets=(6, 6))
    cf = held.counterfactual(validation, seed=0)
    run_dir = tmp_path / "run"
    _new_run(run_dir, train)
    with pytest.raises(ValueError, match="counterfactual: give the held-out images it was made from as validation="):
        i2x.experiment(run_dir, setup["model"], train, test, arms=["full"], seeds=1, targets=setup["targets"],
                       counterfactual=cf, **SETTINGS)
    res = i2x.experiment(run_dir, setup["model"], train, test, arms=["full", "full->full", "curated->full"], seeds=2,
                         targets=setup["targets"], validation=validation, counterfactual=cf, **SETTINGS)
    assert res["config"]["counterfactual_size"] == len(cf) == 12
    start = i2x.evaluate(setup["model"], cf, calibration_images(train), num_classes=3)
    assert res["start"]["counterfactual"]["confusion"] == start["confusion"]
    for entry in res["arms"].values():
        for cell in entry["seeds"].values():
            assert sum(map(sum, cell["counterfactual"]["confusion"])) == 12
    assert res["recommendation"]["decided_on"] == "decision"


def test_an_experiment_with_validation_evaluates_every_cell_there(setup, tmp_path):
    train, test = setup["train"], setup["test"]
    validation = image_dataset(90, 3, seed=2, signal=0.3)  # held out of training: another draw
    run_dir = tmp_path / "run"
    _new_run(run_dir, train)
    res = i2x.experiment(run_dir, setup["model"], train, test, arms=["full", "full->full", "curated->full"], seeds=2,
                         targets=setup["targets"], validation=validation, **SETTINGS)
    assert res["config"]["validation_size"] == 90 and "validation" in res["start"]
    for entry in res["arms"].values():
        for cell in entry["seeds"].values():
            assert sum(map(sum, cell["validation"]["confusion"])) == 90
    # the cell's validation numbers: the same weights evaluated on the validation images
    n, seed = len(train), 1
    model = copy.deepcopy(setup["model"])
    i2x.finetune(model, train, epochs=1, lr=SETTINGS["lr"], batch_size=SETTINGS["batch_size"], precision="fp32",
                 seed=seed, order=lambda e: epoch_permutation(n, seed, e))
    ev = i2x.evaluate(model, validation, calibration_images(train), num_classes=3)
    assert ev["confusion"] == res["arms"]["full"]["seeds"]["1"]["validation"]["confusion"]
    assert res["recommendation"] == i2x.loop.experiments.recommendation(res)
    text = (run_dir / "experiment" / "results.md").read_text()
    assert ("**Recommended:" in text) or ("**No arm recommended:**" in text)
    assert "decided on 90 held-out training images" in text
