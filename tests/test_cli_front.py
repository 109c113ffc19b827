"""The command's front door: ``--help`` without torch, ``i2x train``, ``i2x info``, ``--json``
everywhere, exit codes and one-line errors, progress output that stays out of logs, the
one-writer lock on a run folder, and i2x's work named in profiler traces.

Truths: a fresh interpreter's ``sys.modules``; the run ``i2x train`` writes, read back through
``RunStore`` and compared with the model it saved; the pid of a second process holding the lock;
the event names torch.profiler records.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import i2x
from i2x.cli import main
from i2x.store import RunLockedError, RunStore

TRAIN = ["--data", "digits", "--epochs", "1", "--train-size", "400", "--probe-size", "80", "--n-prototypes", "4",
         "--widths", "4,8,16"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def _i2x(*args, cwd, timeout=300) -> subprocess.CompletedProcess:
    """``python -m i2x ARGS`` in a subprocess (stderr is a pipe, not a terminal)."""
    return subprocess.run([sys.executable, "-m", "i2x", *map(str, args)], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run made by ``i2x train --json`` in a subprocess, with what it printed."""
    base = tmp_path_factory.mktemp("front")
    proc = _i2x("train", base / "run", *TRAIN, "--json", cwd=base)
    assert proc.returncode == 0, proc.stderr
    return {"run": base / "run", "base": base, "out": json.loads(proc.stdout), "stderr": proc.stderr}


# -- --help ------------------------------------------------------------------------------------


def test_help_answers_without_importing_torch(tmp_path):
    code = textwrap.dedent("""
        import contextlib, io, json, sys, time
        started = time.perf_counter()
        from i2x.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(["--help"])
            except SystemExit as e:
                status = e.code
        print(json.dumps({"status": status, "torch": "torch" in sys.modules, "numpy": "numpy" in sys.modules,
                          "seconds": time.perf_counter() - started, "help": out.getvalue()}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == 0
    assert report["torch"] is False and report["numpy"] is False, "i2x --help imported torch/numpy"
    for command in ("demo", "train", "track", "analyze", "curate", "experiment", "report", "explain", "bench", "info"):
        assert f"    {command}" in report["help"], f"--help does not list {command}"
    assert report["seconds"] < 1.0, f"i2x --help took {report['seconds']:.2f} s (the goal: under a second)"


def test_every_subcommand_has_help_and_the_common_options(tmp_path):
    for command in ("demo", "train", "track", "analyze", "curate", "experiment", "report", "explain", "bench", "info"):
        proc = _i2x(command, "--help", cwd=tmp_path, timeout=60)
        assert proc.returncode == 0, (command, proc.stderr)
        for option in ("--quiet", "--json", "--debug"):
            assert option in proc.stdout, f"i2x {command} --help lacks {option}"


# -- i2x train and i2x info --------------------------------------------------------------------


def test_train_writes_a_complete_run_that_matches_its_weights(trained):
    out, store = trained["out"], RunStore.open(trained["run"])
    assert out["run"] == str(trained["run"]) and out["train_samples"] == 400
    assert store.has("prototypes") and store.has("weights") and store.stage("train")["samples"] == 400
    assert out["checkpoints"] == store.finished_steps() and store.final_step() == store.finished_steps()[-1]
    assert store.manifest["dataset"]["subset"] == {"size": 400, "seed": 0}
    # The reported test accuracy is the saved model's, recomputed here without the CLI.
    model, _ = i2x.models.rebuild_model(store.manifest["model"]["build"])
    model.load_state_dict(store.read_weights())
    train = i2x.data.load_recorded_dataset(store.manifest["dataset"], train=True)
    test = i2x.load_dataset("digits", train=False)
    from i2x.loop.training import calibration_images

    ev = i2x.evaluate(model, test, calibration_images(train))
    assert out["test_accuracy"] == pytest.approx(ev["accuracy"], abs=1e-9)
    # The recorded subset is the same 400 samples: the probe's labels sit at the probe's positions.
    idx, labels = store.probe()
    assert torch.equal(train.labels[idx], labels)


def test_train_again_reuses_the_run(trained):
    before = (trained["run"] / "weights.safetensors").stat().st_mtime_ns
    proc = _i2x("train", trained["run"], *TRAIN, cwd=trained["base"])
    assert proc.returncode == 0, proc.stderr
    assert "reused the trained model" in proc.stderr
    assert (trained["run"] / "weights.safetensors").stat().st_mtime_ns == before


def test_train_into_a_folder_holding_another_run_is_refused(trained):
    proc = _i2x("train", trained["run"], *TRAIN[:-2], "--widths", "8,16,32", "--probe-size", "90", cwd=trained["base"])
    assert proc.returncode == 2 and "holds a different run" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_info_json_for_a_run_and_for_the_build(trained, capsys):
    assert main(["info", str(trained["run"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    store = RunStore.open(trained["run"])
    assert info["finished_checkpoints"] == store.finished_steps() and "prototypes" in info["stages"]
    assert main(["info", "--json"]) == 0
    build = json.loads(capsys.readouterr().out)
    assert build == json.loads(json.dumps(i2x.build_info()))


def test_analyze_and_explain_json(trained, capsys):
    assert main(["analyze", str(trained["run"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    analysis = i2x.load_analysis(trained["run"])
    assert out["checkpoints"] == len(analysis.steps) and out["prototypes"] == analysis.data["num_prototypes"]
    assert [p["pair"] for p in out["pairs"]] == [u["pair"] for u in analysis.data["uncertainty"]]
    assert main(["explain", str(trained["run"]), "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer == json.loads(json.dumps(i2x.explain_sample(trained["run"], 3).to_dict()))


# -- progress output ---------------------------------------------------------------------------


def test_no_progress_bars_when_stderr_is_not_a_terminal_and_nothing_with_quiet(tmp_path):
    proc = _i2x("train", tmp_path / "a", *TRAIN, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr and "step/s" not in proc.stderr
    assert "checkpoint at step" in proc.stderr  # status lines still tell what happens
    assert proc.stdout.startswith("i2x train: run ")
    quiet = _i2x("train", tmp_path / "b", *TRAIN, "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""
    js = _i2x("train", tmp_path / "c", *TRAIN, "--json", cwd=tmp_path)
    assert js.returncode == 0 and js.stderr == "" and json.loads(js.stdout)["train_samples"] == 400


def test_progress_bar_shows_on_a_terminal():
    """The same bar code on a terminal-like stream draws a bar (tqdm's own rule)."""
    from i2x._internal import progress as _progress

    class Terminal:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    term, saved = Terminal(), sys.stderr
    sys.stderr = term
    try:
        for _ in _progress.bar(range(3), desc="work"):
            pass
        _progress.configure(quiet=True)
        for _ in _progress.bar(range(3), desc="silent"):
            pass
    finally:
        _progress.configure(quiet=False)
        sys.stderr = saved
    assert "work:" in term.text and "0/3" in term.text and "silent" not in term.text


# -- exit codes and one-line errors ------------------------------------------------------------


@pytest.mark.parametrize("args, status, words", [
    (["info", "{tmp}/missing"], 2, "does not exist"),
    (["analyze", "{tmp}/missing"], 2, "does not exist"),
    (["report", "{tmp}/missing"], 2, "does not exist"),
    (["explain", "{tmp}/missing", "0"], 2, "does not exist"),
    (["train", "{tmp}/r", "--data", "no-such-data"], 2, "no-such-data"),
    (["train", "{tmp}/r", "--data", "digits", "--epochs", "0"], 2, "positive integer"),
    (["demo", "--quick", "--full"], 2, "not allowed with"),
    (["no-such-command"], 2, "invalid choice"),
])
def test_bad_usage_exits_2_with_one_line(tmp_path, args, status, words):
    proc = _i2x(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path, timeout=120)
    assert proc.returncode == status, proc.stderr
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
    if args[0] != "no-such-command" and "--quick" not in args and "--epochs" not in args:
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_corrupt_run_is_one_line_and_debug_shows_the_traceback(trained, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("manifest.json", "probe.safetensors"):
        (broken / f).write_bytes((trained["run"] / f).read_bytes())
    (broken / "probe.safetensors").write_bytes(b"not a safetensors file")
    proc = _i2x("info", broken, cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "probe.safetensors" in proc.stderr and "corrupt" in proc.stderr
    debug = _i2x("info", broken, "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "RunStoreError" in debug.stderr


def test_interrupt_exits_130_and_says_how_to_resume(monkeypatch, capsys):
    import i2x.cli.runs as runs

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "_info", interrupted)
    assert main(["info"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_a_failure_of_the_work_exits_1(monkeypatch, capsys):
    import i2x.cli.runs as runs

    def fails(args):
        raise RuntimeError("out of memory\nwhile doing things")

    monkeypatch.setattr(runs, "_info", fails)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err == "i2x info: failed: RuntimeError: out of memory while doing things\n"


# -- one writer per run ------------------------------------------------------------------------

_HOLDER = """
import sys, time
from pathlib import Path
from i2x.store import RunStore
store = RunStore.open(sys.argv[1]).lock_for_writing()
Path(sys.argv[2]).write_text("locked")
time.sleep(600)
"""


def _hold_lock(run: Path, tmp_path: Path) -> subprocess.Popen:
    flag = tmp_path / "locked.flag"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run), str(flag)], env=_env(), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert holder.poll() is None, "the lock holder died"
        assert time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.05)
    return holder


def test_a_second_writer_is_refused_with_the_pid_until_the_first_dies(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    holder = _hold_lock(run, tmp_path)
    try:
        manifest_before = (run / "manifest.json").read_bytes()
        store = RunStore.open(run)  # reading is fine
        with pytest.raises(RunLockedError, match=f"being written by pid {holder.pid}"):
            store.write_json("notes", {"a": 1})
        assert not (run / "notes.json").exists() and (run / "manifest.json").read_bytes() == manifest_before
        proc = _i2x("analyze", run, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert f"is being written by pid {holder.pid}" in proc.stderr and len(proc.stderr.splitlines()) == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The OS dropped the dead writer's lock: writing works now.
    store = RunStore.open(run)
    store.write_json("notes", {"a": 1})
    assert json.loads((run / "notes.json").read_text()) == {"a": 1}
    store.release()


def test_stores_of_one_process_share_the_lock_and_release_it(trained, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for f in ("manifest.json", "probe.safetensors"):
        (run / f).write_bytes((trained["run"] / f).read_bytes())
    first, second = RunStore.open(run), RunStore.open(run)
    first.write_json("one", {"x": 1})
    second.write_json("two", {"x": 2})  # same process: not refused
    first.release()
    second.release()
    # Released in this process: another process can take it (and reports success).
    code = f"from i2x.store import RunStore; RunStore.open({str(run)!r}).write_json('three', {{'x': 3}}); print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr
    # A store dropped without release() gives the lock back when it is garbage-collected.
    third = RunStore.open(run)
    third.write_json("four", {"x": 4})
    del third
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr


# -- profiler ranges ---------------------------------------------------------------------------


def test_i2x_work_is_named_in_profiler_traces(tmp_path):
    from _models import NUM_CLASSES, tiny_cnn, tiny_input

    model, layer = tiny_cnn(), "features.5"
    x, y = tiny_input(4), torch.tensor([0, 1, 2, 3])
    explainer = i2x.Explainer(model, layer)
    probe = i2x.Probe(tiny_input(6, seed=2), torch.arange(6) % NUM_CLASSES, [f"c{k}" for k in range(NUM_CLASSES)])
    tracker = i2x.Tracker(model, layer, probe, tmp_path / "run", schedule=[1])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        explainer.explain(x)
        with explainer.capture() as captured:
            logits = model(x)
        explainer.explain_from(captured, logits, y)
        tracker.step(1)
    names = {e.key for e in prof.key_averages()}
    for name in ("i2x::explain", "i2x::explain_from", "i2x::record_checkpoint", "i2x::cam"):
        assert name in names, f"{name} is not in the trace (has: {sorted(n for n in names if 'i2x' in n)})"
