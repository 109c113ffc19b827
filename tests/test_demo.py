"""``i2x demo --quick`` end to end, as a newcomer runs it: interrupted with Ctrl-C, resumed, run
again (everything reused), and its report opened in headless Chromium.

Truths: the files the demo leaves (its summary must equal what ``demo.json``, the experiment's
``results.json`` and the run's own records say), the base model's accuracy recomputed here from
the saved weights, file modification times across a second run, and the browser's view of the
report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import i2x
import i2x.apps.demo
from i2x.store import RunStore

MAX_REPORT_BYTES = 5 * 1024 * 1024


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def _demo(folder: Path, *extra, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "i2x", "demo", str(folder), "--quick", *extra], cwd=folder.parent,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Start the quick demo, press Ctrl-C once training is done, then run it again to the end."""
    folder = tmp_path_factory.mktemp("demo") / "run"
    started = time.perf_counter()
    # Ctrl-C as at a terminal: a shell starts background jobs with SIGINT ignored, and the child
    # would inherit that (Python then installs no KeyboardInterrupt handler and the demo runs on).
    first = subprocess.Popen([sys.executable, "-m", "i2x", "demo", str(folder), "--quick"], cwd=folder.parent,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not (folder / "weights.safetensors").exists() and first.poll() is None:
        assert time.monotonic() < deadline, "the demo did not finish training in 10 minutes"
        time.sleep(0.1)
    interrupted = first.poll() is None
    if interrupted:
        first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=300)
    resumed = _demo(folder, "--json")
    seconds = time.perf_counter() - started
    assert resumed.returncode == 0, resumed.stderr
    print(f"\nquick demo: {seconds:.0f} s for an interrupted run plus its resumption")
    return {"folder": folder, "first": (first.returncode, out, err), "interrupted": interrupted,
            "summary": json.loads(resumed.stdout), "stderr": resumed.stderr}


def test_ctrl_c_exits_130_and_the_demo_resumes(demo):
    status, _, err = demo["first"]
    if not demo["interrupted"]:
        pytest.skip("the first demo finished before it could be interrupted")
    assert status == 130, err
    assert "interrupted" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    # Warnings of the work (an overlapping pair) are the command's own lines, not Python's format.
    assert "LabelOverlapWarning" not in err + demo["stderr"], demo["stderr"]
    # The resumed demo did not train again: the weights written before Ctrl-C were reused.
    assert "reused the trained model" in demo["stderr"] or "i2x: checkpoint at step" not in demo["stderr"]


def test_the_summary_is_what_the_run_holds(demo):
    s, folder = demo["summary"], demo["folder"]
    store = RunStore.open(folder)
    on_disk = store.read_json("demo")
    for key in ("run", "dataset", "train_samples", "test_samples", "evaluation", "pair", "targets", "best_arm"):
        assert s[key] == on_disk[key], key
    plan = i2x.apps.demo.DEMO_PLANS["quick"]
    results = i2x.load_results(folder)
    # Every arm x seed of the quick plan finished, and the start accuracy is the summary's.
    for arm in plan.arms:
        assert sorted(int(k) for k in results["arms"][arm]["seeds"]) == list(range(plan.seeds)), arm
    assert s["evaluation"]["accuracy"] == pytest.approx(results["start"]["accuracy"], abs=1e-12)
    a, b = s["pair"]["pair"]
    conf = s["evaluation"]["confusion"]
    assert s["pair"]["test_confusions"] == conf[a][b] + conf[b][a]
    assert s["pair"]["pair"] == store.read_json("analysis")["uncertainty"][0]["pair"]
    # The best arm is the explanation arm with the fewest confusions, its comparisons the summary's.
    arms = {k: v for k, v in results["summary"].items() if k not in ("full->full", "random->full", "hard->full")}
    best = min(arms, key=lambda k: arms[k]["pair_confusions_mean"])
    assert s["best_arm"]["arm"] == best
    assert s["best_arm"]["against"]["full->full"]["pair_confusions"] == \
        results["summary"][best]["comparisons"]["full->full"]["pair_confusions"]
    # The accuracy is the saved model's on the test images (recomputed here, not read back).
    from i2x.loop.training import calibration_images

    model, _ = i2x.models.rebuild_model(store.manifest["model"]["build"])
    model.load_state_dict(store.read_weights())
    train = i2x.data.load_recorded_dataset(store.manifest["dataset"], train=True)
    test, _ = i2x.data.training_subset(i2x.load_dataset(train.name, train=False), plan.test_size, seed=0)
    assert s["test_samples"] == len(test)
    assert i2x.evaluate(model, test, calibration_images(train))["accuracy"] == pytest.approx(s["evaluation"]["accuracy"])


def test_the_text_summary_has_seven_lines_and_says_where_things_are(demo):
    lines = i2x.apps.demo.summary_lines(demo["summary"])
    assert len(lines) == 7
    assert [line.split()[0] for line in lines[:6]] == ["accuracy", "shortcuts", "pair", "uncertain", "diagnosis",
                                                        "targets"]
    analysis = json.loads((demo["folder"] / "analysis.json").read_text())
    flagged = [p for e in analysis["shortcuts"]["per_class"] for p in e["flagged"]]
    if flagged:  # the strongest first
        assert lines[1].startswith(f"shortcuts     prototype {max(flagged, key=lambda p: p['score'])['prototype']} for ")
    else:
        assert lines[1] == "shortcuts     none flagged by the model-wide reading"
    labels = json.loads((demo["folder"] / "labels.json").read_text()) if (demo["folder"] / "labels.json").exists() \
        else None
    if labels is not None:  # cleanlab installed: the pair's verdict, as the diagnosis wrote it
        assert lines[4] == f"diagnosis     {labels['pairs'][0]['line']}"
        assert labels["pairs"][0]["pair"] == demo["summary"]["pair"]["pair"]
    else:
        assert "needs cleanlab" in lines[4]
    best = demo["summary"]["best_arm"]
    against = best["against"].values()
    beats = bool(against) and all(c["pair_confusions"]["hi"] is not None and c["pair_confusions"]["hi"] < 0
                                  for c in against)
    assert best["beats_controls"] == beats
    if best.get("validation_size"):  # decided on held-out training images
        assert lines[6].startswith("recommended" if best["recommended"] else "no arm won")
    else:
        assert lines[6].startswith("best arm" if beats else "no arm won")
    report = Path(demo["summary"]["report"])
    assert report == demo["folder"] / "report" / "index.html" and report.exists()
    assert report.stat().st_size < MAX_REPORT_BYTES


def test_a_second_demo_reuses_every_stage(demo):
    folder = demo["folder"]
    watched = ["weights.safetensors", "prototypes.safetensors", "analysis.json", "targets.json",
               "experiment/results.json"]
    before = {f: (folder / f).stat().st_mtime_ns for f in watched}
    again = _demo(folder)
    assert again.returncode == 0, again.stderr
    assert "reused the trained model" in again.stderr
    assert "checkpoint at step" not in again.stderr and "seed 0:" not in again.stderr  # nothing retrained
    assert {f: (folder / f).stat().st_mtime_ns for f in watched} == before
    assert again.stdout.splitlines()[-7:] == i2x.apps.demo.summary_lines(demo["summary"])
    summary = RunStore.open(folder).read_json("demo")
    for key in ("evaluation", "pair", "targets", "best_arm"):
        assert summary[key] == demo["summary"][key], key


def test_the_demo_report_renders_in_chromium(demo, tmp_path):
    from _browser import render, unavailable

    why = unavailable()
    if why:
        if os.environ.get("I2X_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test is required here but cannot run: {why}")
        pytest.skip(why)
    from i2x.report import SECTIONS

    shot = tmp_path / "demo-report.png"
    seen = render(Path(demo["summary"]["report"]), shot)
    assert seen["errors"] == [] and seen["requests"] == []
    assert seen["sections"] == [section_id for section_id, _ in SECTIONS]
    assert seen["images"], "the demo report shows no images"
    for img in seen["images"]:
        assert img["complete"] and img["decoded"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0, img
    assert shot.stat().st_size > 10_000


def test_without_fashion_mnist_the_demo_data_are_the_digits_and_it_says_so(monkeypatch):
    from i2x.apps import demo as pipeline

    real = pipeline.load_dataset

    def no_fashion(name, *args, **kwargs):
        if name == "fashion-mnist":
            raise FileNotFoundError("fashion-mnist: looked in ... (test)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load_dataset", no_fashion)
    train, test, why = pipeline.default_data()
    assert train.name == test.name == "digits" and train.split == "train" and test.split == "test"
    assert tuple(train.image_shape) == (1, 28, 28)
    assert why.startswith("digits") and "Fashion-MNIST was not found" in why
    named, _, why_named = pipeline.default_data("digits")
    assert named.name == "digits" and why_named == "digits (as asked)"
