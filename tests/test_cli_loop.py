"""``i2x curate`` and ``i2x experiment``: the closed loop from the command line.

Truths: on a run built through the Python API (digits, a small ResNet, a Tracker that keeps the
final weights), the command's targets equal ``i2x.find_targets`` on the same model and data, its
experiment cell equals ``i2x.loop.experiments``'s, a second ``experiment`` recomputes no finished cell,
a pair without flagged prototypes is "nothing to curate" (status 0), and every bad input is one
line on stderr with status 2 (a failure during the work: status 1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import i2x
from i2x.cli import main

WIDTHS = (8, 16, 32)


def _env() -> dict:
    # Run from elsewhere: `-m` puts the working directory first on the path, and the repository
    # root holds the unbuilt source package.
    return {**os.environ, "PYTHONPATH": str(Path(i2x.__file__).resolve().parents[1]),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def _cli(cwd, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "i2x", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """A finished, analysed run of a small ResNet on digits, with its final weights kept."""
    base = tmp_path_factory.mktemp("loop")
    run = base / "run"
    train = i2x.load_dataset("digits")
    torch.manual_seed(0)
    model, layer = i2x.build_model("small-resnet", num_classes=10, widths=WIDTHS)
    probe = i2x.Probe.from_dataset(train, size=300, seed=0)
    epochs, steps_per_epoch = 2, -(-len(train) // 128)
    tracker = i2x.Tracker(model, layer, probe, run, planned_steps=epochs * steps_per_epoch, n_checkpoints=4,
                          recalibrate_bn=128)
    i2x.train(model, train, epochs, batch_size=128, tracker=tracker, precision="fp32")
    tracker.finish(prototypes={"n_prototypes": 8, "pca_dim": 16}, save_weights=True)
    analysis = i2x.analyze(run, n_pairs=3)
    flagged = [e["pair"] for e in analysis.data["uncertainty"] if e["flagged"] or e.get("decisive")]
    assert flagged, "the fixture's analysis flagged no prototype for any pair"
    return {"run": run, "base": base, "pair": tuple(flagged[0])}


def _final_model(run):
    store = i2x.RunStore.open(run)
    model, _ = i2x.models.rebuild_model(store.manifest["model"]["build"])
    model.load_state_dict(store.read_weights())
    return model


def _copy(loop, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(loop["run"], dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"i2x {command}: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------------------------
# curate


def test_curate_equals_find_targets(loop, tmp_path, capsys):
    run, (a, b) = loop["run"], loop["pair"]
    out = _cli(tmp_path, "curate", run, "--data", "digits", "--pair", a, b, "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["status"] == "ok" and answer["pair"] == [a, b]
    assert set(answer["per_class"]) == {str(a), str(b)} and answer["targets"] > 0
    assert all(p["kind"] in ("ambivalent", "decisive") and p["reason"] for p in answer["prototypes"])

    written = i2x.load_targets(run)
    api = i2x.find_targets(run, _final_model(run), i2x.load_dataset("digits"), pairs=[(a, b)], save=False)
    assert torch.equal(written.target_indices, api.target_indices)
    torch.testing.assert_close(written.scores, api.scores)
    assert answer["targets"] == len(api) and answer["per_class"] == api.summary()["per_class"]

    # The table, from weights given as a nested torch file, with a rule option.
    weights = tmp_path / "final.pt"
    torch.save({"state_dict": _final_model(run).state_dict(), "epoch": 2}, weights)
    assert main(["curate", str(run), "--data", "digits", "--pair", str(a), str(b), "--weights", str(weights),
                 "--rule-option", "max_fraction=0.25", "--rule-option", "kinds=ambivalent,decisive"]) == 0
    text = capsys.readouterr().out
    assert "targets among the" in text and f"written to {run / 'targets.json'}" in text
    assert "prototype " in text and "max_fraction 0.25" in text
    capped = i2x.load_targets(run)
    assert 0 < len(capped) <= int(0.25 * capped.indices.numel())


def test_nothing_to_curate_is_status_0(loop, tmp_path, capsys):
    run, (a, b) = _copy(loop, tmp_path), loop["pair"]

    def unflag(data):
        for entry in data["uncertainty"]:
            if tuple(entry["pair"]) == (a, b):
                entry["flagged"], entry["decisive"] = [], []

    _edit_json(run / "analysis.json", unflag)
    assert main(["curate", str(run), "--data", "digits", "--pair", str(b), str(a), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["status"] == "nothing_to_curate" and answer["pair"] == [a, b]
    assert answer["message"].startswith(f"nothing to curate for ({a}, {b})")
    assert main(["curate", str(run), "--data", "digits", "--pair", str(a), str(b)]) == 0
    assert capsys.readouterr().out.startswith(f"i2x curate: nothing to curate for ({a}, {b})")


# ----------------------------------------------------------------------------------------------
# experiment


def test_experiment_equals_api_and_resumes(loop, tmp_path, capsys):
    run = loop["run"]
    args = ["experiment", run, "--data", "digits", "--arms", "full,full->full", "--seeds", "1", "--precision", "fp32"]
    out = _cli(tmp_path, *args, "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert set(summary) == {"full", "full->full"} and summary["full"]["seeds"] == [0]
    cells = i2x.load_results(run)["arms"]
    assert summary["full"]["accuracy_mean"] == cells["full"]["seeds"]["0"]["accuracy"]

    api = i2x.experiment(run, _final_model(run), i2x.load_dataset("digits"), i2x.load_dataset("digits", train=False),
                         arms=["full"], seeds=1, precision="fp32", name="api")
    assert api["arms"]["full"]["seeds"]["0"]["confusion"] == cells["full"]["seeds"]["0"]["confusion"]

    # Resumed: the finished cells are kept as they are; only the new arm runs (one log line).
    capsys.readouterr()
    assert main([str(v) for v in args[:5]] + ["full,full->full,full->full->full", *map(str, args[6:])]) == 0
    text = capsys.readouterr().out
    assert "full->full->full seed 0: accuracy" in text and "  full seed 0:" not in text
    assert "| full->full | 1 |" in text and "# Experiment:" in text
    again = i2x.load_results(run)["arms"]
    assert again["full"] == cells["full"] and again["full->full"] == cells["full->full"]
    assert "0" in again["full->full->full"]["seeds"]


def test_experiment_failure_is_status_1(loop, tmp_path, capsys):
    run = _copy(loop, tmp_path)
    assert main(["experiment", str(run), "--data", "digits", "--arms", "full", "--seeds", "1", "--lr", "1e12",
                 "--name", "diverge", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("i2x experiment: failed: FloatingPointError:") and err.count("\n") == 1


def test_experiment_holds_out_what_the_run_did_not_train_on(tmp_path, capsys):
    """A run ``i2x train`` made on 1,000 of digits' training images: ``i2x experiment`` decides its
    recommendation on the other images and their counterfactual copies, exactly as the API does
    with ``held_out_images`` and ``counterfactual_split``; ``--hold-out 0`` holds out none."""
    from i2x.data import held_out_images, training_subset
    from i2x.loop import counterfactual_split

    run = tmp_path / "run"
    assert main(["train", str(run), "--data", "digits", "--train-size", "1000", "--epochs", "2", "--widths", "8,16,32",
                 "--probe-size", "300", "--n-prototypes", "8", "--precision", "fp32", "--quiet"]) == 0
    analysis = i2x.analyze(run, n_pairs=3)
    pair = next((e["pair"] for e in analysis.data["uncertainty"] if e["flagged"] or e.get("decisive")), None)
    assert pair, "the run's analysis flagged no prototype for any pair"
    assert main(["curate", str(run), "--data", "digits", "--pair", str(pair[0]), str(pair[1]), "--quiet"]) == 0
    arms = ["--arms", "full->full,curated->full,random->full", "--seeds", "2", "--precision", "fp32", "--quiet"]
    assert main(["experiment", str(run), "--data", "digits", *arms, "--hold-out", "300"]) == 0
    results = i2x.load_results(run)
    assert results["config"]["validation_size"] == 300

    full = i2x.load_dataset("digits")
    train, _ = training_subset(full, 1000, seed=0)
    validation = held_out_images(full, 1000, 300)
    model = _final_model(run)
    copies = counterfactual_split(i2x.RunStore.open(run), model, validation, train)
    assert copies is not None and results["config"]["counterfactual_size"] == len(copies)
    api = i2x.experiment(run, model, train, i2x.load_dataset("digits", train=False), arms=["full->full"], seeds=1,
                         precision="fp32", validation=validation, counterfactual=copies, name="api")
    cli_cell, api_cell = results["arms"]["full->full"]["seeds"]["0"], api["arms"]["full->full"]["seeds"]["0"]
    for split in ("validation", "counterfactual"):
        assert cli_cell.get(split) == api_cell.get(split), split
    assert "recommendation" in results and "no validation images" not in results["recommendation"]["reason"]

    # --hold-out 0: none held out, so nothing is recommended, and the results say why
    assert main(["experiment", str(run), "--data", "digits", *arms, "--hold-out", "0", "--name", "none"]) == 0
    none = i2x.load_results(run, name="none")
    assert "validation_size" not in none["config"] and "no validation images" in none["recommendation"]["reason"]
    # resumed without --hold-out 0 it would hold images out: refused, saying how it began
    assert main(["experiment", str(run), "--data", "digits", *arms, "--name", "none"]) == 2
    assert "it held out none (validation=; from the command line --hold-out 0)" in _one_line_error(capsys, "experiment")
    # by default: the demo's 2,000, or as many as are left (437)
    assert main(["experiment", str(run), "--data", "digits", "--arms", "full->full", "--seeds", "1", "--precision",
                 "fp32", "--quiet", "--name", "auto"]) == 0
    assert i2x.load_results(run, name="auto")["config"]["validation_size"] == len(full) - 1000


# ----------------------------------------------------------------------------------------------
# one-line errors


@pytest.mark.parametrize("command", ["curate", "experiment"])
def test_errors_are_one_line_with_status_2(loop, tmp_path, capsys, command):
    run = loop["run"]
    extra = ["--arms", "full", "--seeds", "1"] if command == "experiment" else []

    def call(folder, *args):
        return main([command, str(folder), "--data", "digits", *extra, *map(str, args)])

    assert call(tmp_path / "nowhere") == 2
    assert "does not exist" in _one_line_error(capsys, command)

    assert call(run, "--weights", tmp_path / "missing.safetensors") == 2
    assert "does not exist" in _one_line_error(capsys, command)

    other, _ = i2x.build_model("small-resnet", num_classes=10, widths=(4, 8, 16))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    assert call(run, "--weights", tmp_path / "other.pt") == 2
    assert "do not fit the run's" in _one_line_error(capsys, command)

    assert call(run, "--size", 16) == 2
    err = _one_line_error(capsys, command)
    assert "grid" in err and "--size" in err

    no_weights = _copy(loop, tmp_path, "no-weights")
    (no_weights / "weights.safetensors").unlink()
    assert call(no_weights) == 2
    err = _one_line_error(capsys, command)
    assert "keeps no final weights" in err and "--weights" in err

    no_build = _copy(loop, tmp_path, "no-build")
    _edit_json(no_build / "manifest.json", lambda m: m["model"].pop("build"))
    assert call(no_build) == 2
    err = _one_line_error(capsys, command)
    assert "cannot be rebuilt" in err and "i2x did not build it" in err and f"i2x.{'find_targets'}" in err

    renamed = _copy(loop, tmp_path, "renamed")
    _edit_json(renamed / "manifest.json", lambda m: m.update(classes=[f"c{i}" for i in range(10)]))
    assert call(renamed) == 2
    assert "has the classes" in _one_line_error(capsys, command)


def test_bad_options(loop, tmp_path, capsys):
    run = str(loop["run"])
    exp = ["experiment", run, "--data", "digits", "--seeds", "1"]
    assert main([*exp, "--arms", "full,fulll"]) == 2
    assert "'fulll'" in _one_line_error(capsys, "experiment")
    assert main([*exp, "--arms", "clean"]) == 2
    assert "Python API" in _one_line_error(capsys, "experiment")
    assert main([*exp, "--arms", " , "]) == 2
    _one_line_error(capsys, "experiment")
    assert main([*exp, "--arms", "full", "--hold-out", "100"]) == 2  # the run trained on every image
    err = _one_line_error(capsys, "experiment")
    assert "--hold-out 100" in err and "every training image of 'digits'" in err and "--train-size" in err

    cur = ["curate", run, "--data", "digits"]
    assert main([*cur, "--rule-option", "tresh=0.3"]) == 2
    err = _one_line_error(capsys, "curate")
    assert "unknown option" in err and "threshold" in err
    assert main([*cur, "--rule-option", "top_q=2"]) == 2
    assert "top_q" in _one_line_error(capsys, "curate")
    assert main([*cur, "--rule-option", "max_fraction=half"]) == 2
    assert "expected a number" in _one_line_error(capsys, "curate")
    assert main([*cur, "--rule-option", "score=peak"]) == 2
    assert "score" in _one_line_error(capsys, "curate")
    assert main([*cur, "--pair", "3", "x"]) == 2
    assert "neither a class index" in _one_line_error(capsys, "curate")
    assert main([*cur, "--pair", "3", "3"]) == 2
    assert "two different classes" in _one_line_error(capsys, "curate")
    with pytest.raises(SystemExit) as stop:
        main([*cur, "--rule-option", "threshold"])  # argparse: not KEY=VALUE
    assert stop.value.code == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_python_m_i2x(tmp_path):
    out = _cli(tmp_path, "--help", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "curate" in out.stdout and "experiment" in out.stdout
    out = _cli(tmp_path, "experiment", tmp_path / "nowhere", "--data", "digits", timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("i2x experiment: error: run folder")
    assert out.stderr.count("\n") == 1 and out.stdout == ""


# ----------------------------------------------------------------------------------------------
# labels: the label diagnosis, and the experiment's warning on an overlapping pair


def test_labels_equals_the_api_and_the_experiment_warns_on_overlap(loop, tmp_path, capsys):
    pytest.importorskip("cleanlab")
    from i2x.analysis.labels import diagnose_labels

    run = _copy(loop, tmp_path)
    capsys.readouterr()
    assert main(["labels", str(run), "--data", "digits", "--images", "1000", "--n-pairs", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    on_disk = json.loads((run / "labels.json").read_text())
    assert printed["pairs"] == on_disk["pairs"] and len(on_disk["pairs"]) == 2
    api = diagnose_labels(run, _final_model(run), i2x.load_dataset("digits"), n_pairs=2, n_images=1000, save=False)
    assert [e["issue_positions"] for e in api["pairs"]] == [e["issue_positions"] for e in on_disk["pairs"]]
    analysis = json.loads((run / "analysis.json").read_text())
    assert [e["pair"] for e in on_disk["pairs"]] == [e["pair"] for e in analysis["uncertainty"][:2]]
    for entry in on_disk["pairs"]:
        assert entry["verdict"] in ("shortcut", "both", "overlap", "unclear") and entry["line"].startswith(
            f"{entry['names'][0]} vs {entry['names'][1]}: ")
    assert main(["labels", str(run), "--data", "digits", "--images", "1000"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("i2x labels: ") and all(f"  {e['line']}" in text for e in on_disk["pairs"])

    # Marked as overlap, the pair the experiment will compare on gets a warning before the work.
    pair = on_disk["pairs"][0]["pair"]
    (run / "targets.json").unlink(missing_ok=True)
    _edit_json(run / "labels.json", lambda d: d["pairs"][0].update(verdict="overlap", line="A vs B: overlapping"))
    assert main(["experiment", str(run), "--data", "digits", "--arms", "full", "--seeds", "1", "--precision", "fp32",
                 "--name", "warned", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "i2x experiment: warning: A vs B: overlapping (i2x labels," in err, (pair, err)
    # The warning is the experiment's own: the Python API raises it too, and not for another verdict.
    from i2x.analysis.labels import LabelOverlapWarning

    digits = i2x.load_dataset("digits"), i2x.load_dataset("digits", train=False)
    with pytest.warns(LabelOverlapWarning, match=r"A vs B: overlapping \(i2x labels, "):
        i2x.experiment(run, _final_model(run), *digits, arms=["full"], seeds=1, precision="fp32", name="warned")
    _edit_json(run / "labels.json", lambda d: d["pairs"][0].update(verdict="shortcut"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LabelOverlapWarning)
        i2x.experiment(run, _final_model(run), *digits, arms=["full"], seeds=1, precision="fp32", name="warned")


def test_labels_refuses_bad_folds_and_a_run_without_analysis(loop, tmp_path, capsys):
    pytest.importorskip("cleanlab")
    run = _copy(loop, tmp_path)
    assert main(["labels", str(run), "--data", "digits", "--folds", "1"]) == 2
    assert "--folds: expected at least 2" in capsys.readouterr().err
    (run / "analysis.json").unlink()
    assert main(["labels", str(run), "--data", "digits"]) == 2
    assert "no analysis: run `i2x analyze RUN`" in capsys.readouterr().err
