"""What a new user broke from a fresh clone, each answered before any work (issue: users' reach
and faults). Every case here failed on the flat package: it wrote outside the run, trained for
minutes first, or ended with exit status 0 or 1 instead of 2.

Truths: the exit status, the one-line message, and the file system before and after (nothing
outside the run, no run folder left by a refused command).
"""

from __future__ import annotations

import re

import pytest

import i2x
from i2x.cli import main


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _usage_error(capsys, argv) -> str:
    """argparse's refusal at parse time: exit status 2 and one line naming the option."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["../../x", "/tmp/elsewhere", "a/b", "..", ""])
def test_an_experiment_name_that_is_not_a_plain_name_is_refused_at_parse_time(tmp_path, capsys, name):
    before = _files(tmp_path)
    err = _usage_error(capsys, ["experiment", str(tmp_path / "run"), "--data", "digits", "--name", name])
    assert "--name" in err and "plain name" in err
    assert _files(tmp_path) == before


def test_the_api_refuses_such_a_name_before_opening_the_run(tmp_path):
    with pytest.raises(ValueError, match=r"name: expected a plain name .* got '\.\./x'"):
        i2x.experiment(tmp_path / "no-run", None, None, None, name="../x")
    with pytest.raises(ValueError, match="name: expected a plain name"):
        i2x.load_results(tmp_path / "no-run", name="/etc")
    assert not (tmp_path / "no-run").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "x"])
def test_a_learning_rate_that_is_not_a_positive_number_is_refused_at_parse_time(tmp_path, capsys, value):
    err = _usage_error(capsys, ["experiment", str(tmp_path / "run"), "--data", "digits", f"--lr={value}"])
    assert "--lr" in err and repr(value) in err


def test_a_penalty_weight_of_nan_is_refused_at_parse_time(tmp_path, capsys):
    err = _usage_error(capsys, ["experiment", str(tmp_path / "run"), "--data", "digits", "--penalty-weight", "nan"])
    assert "--penalty-weight" in err and "finite" in err


@pytest.mark.parametrize("command", [["train", "{run}", "--data", "digits"], ["demo", "{run}"],
                                     ["track", "--run", "{run}", "--checkpoints", "{run}", "--dataset", "digits"],
                                     ["bench"]])
def test_a_device_that_is_not_a_torch_device_is_a_usage_error(tmp_path, capsys, command):
    argv = [a.format(run=tmp_path / "run") for a in command] + ["--device", "potato"]
    err = _usage_error(capsys, argv)
    assert "--device" in err and "'potato'" in err and "cuda:N" in err
    assert not (tmp_path / "run").exists()


def test_a_bogus_arm_is_refused_before_the_demo_trains(tmp_path, capsys):
    status = main(["demo", str(tmp_path / "demo"), "--quick", "--arms", "full->full,bogus"])
    err = capsys.readouterr().err
    assert status == 2
    assert re.search(r"i2x demo: error: --arms: arm .bogus.", err), err
    assert "train:" not in err  # refused before the data were even loaded for training
    assert not (tmp_path / "demo").exists()


def test_an_oracle_arm_is_refused_by_the_demo_before_it_trains(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "demo"), "--quick", "--arms", "oracle->full"]) == 2
    assert "oracle arms need" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_a_training_subset_larger_than_the_dataset_is_refused(tmp_path, capsys):
    status = main(["train", str(tmp_path / "run"), "--data", "digits", "--train-size", "1000000000000", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    assert "--train-size: 1000000000000 is more than the 1438 training images of digits" in err
    assert not (tmp_path / "run").exists()


def test_too_many_prototypes_are_refused_before_training(tmp_path, capsys):
    status = main(["train", str(tmp_path / "run"), "--data", "digits", "--probe-size", "20", "--widths", "4,8,16",
                   "--n-prototypes", "1000000000000", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    # digits are 28 px: small-resnet's layer3 holds a 7 x 7 grid, so 20 probe images give 980 positions.
    assert "--n-prototypes: 1000000000000 is more than the 980 probe positions" in err
    assert not (tmp_path / "run").exists()


def test_train_reports_each_checkpoint_once(tmp_path, capsys):
    status = main(["train", str(tmp_path / "run"), "--data", "digits", "--epochs", "1", "--train-size", "200",
                   "--probe-size", "20", "--widths", "4,8,16", "--n-prototypes", "4", "--batch-size", "50"])
    err = capsys.readouterr().err
    assert status == 0, err
    recorded = re.findall(r"checkpoint at step (\d+) recorded", err)
    store = i2x.RunStore.open(tmp_path / "run")
    assert sorted(map(int, recorded)) == store.finished_steps()  # each finished step said once
    assert store.final_step() == store.finished_steps()[-1]


def test_every_file_of_a_run_has_the_mode_the_umask_gives(tmp_path):
    import os

    import torch

    umask = os.umask(0o022)
    os.umask(umask)
    store = i2x.RunStore.create(tmp_path / "run", model={"name": "m", "layer": "l", "method": "gradcam"},
                                dataset={"name": "x"}, classes=["a", "b"], probe_indices=torch.arange(4),
                                probe_labels=torch.tensor([0, 1, 0, 1]))
    store.write_checkpoint(1, torch.rand(4, 2, 2), torch.full((4, 2), 0.5))
    store.write_json("notes", {"a": 1})
    store.write_weights({"w": torch.zeros(2)}, 1)
    modes = {p.name: p.stat().st_mode & 0o777 for p in store.path.rglob("*") if p.is_file() and p.name != ".i2x-lock"}
    assert {"probe.safetensors", "weights.safetensors", "manifest.json", "notes.json"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


# -- run folders changed by hand: every path stays inside the run, every file is the one written --


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", str(run), "--data", "digits", "--epochs", "1", "--train-size", "200", "--probe-size", "20",
                 "--widths", "4,8,16", "--n-prototypes", "4", "--batch-size", "50", "--quiet"]) == 0
    return run


@pytest.fixture
def run(trained_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def _edit_manifest(run, change):
    import json

    manifest = json.loads((run / "manifest.json").read_text())
    change(manifest)
    (run / "manifest.json").write_text(json.dumps(manifest))


def _refused(capsys, argv, *words) -> None:
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert all(w in err for w in words), err


def test_a_sound_run_passes_info(run, capsys):
    assert main(["info", str(run), "--quiet"]) == 0


def test_a_checkpoint_path_outside_the_run_is_a_corrupt_run(run, capsys):
    _edit_manifest(run, lambda m: m["checkpoints"][0].__setitem__("file", "/etc/hostname"))
    for command in (["info", str(run)], ["analyze", str(run)]):
        _refused(capsys, command, "corrupt", "/etc/hostname")


def test_a_step_edited_by_hand_is_a_corrupt_run(run, capsys):
    _edit_manifest(run, lambda m: m["checkpoints"][1].__setitem__("step", 999))
    for command in (["info", str(run)], ["analyze", str(run)]):
        _refused(capsys, command, "corrupt", "step 999")


def test_steps_out_of_order_are_a_corrupt_run(run, capsys):
    def swap(m):
        first, second = m["checkpoints"][0], m["checkpoints"][1]
        m["checkpoints"][0], m["checkpoints"][1] = second, first

    _edit_manifest(run, swap)
    _refused(capsys, ["analyze", str(run)], "corrupt", "not strictly increasing")


def test_a_file_symlinked_outside_the_run_is_not_read(run, tmp_path, capsys):
    outside = tmp_path / "elsewhere.safetensors"
    (run / "prototypes.safetensors").rename(outside)
    (run / "prototypes.safetensors").symlink_to(outside)
    for command in (["info", str(run)], ["analyze", str(run)]):
        _refused(capsys, command, "corrupt", "leads outside the run folder")


def test_a_file_replaced_after_it_was_written_is_detected(run, capsys):
    steps = sorted((run / "checkpoints").iterdir())
    steps[0].write_bytes(steps[-1].read_bytes())  # a valid checkpoint file, of another step
    for command in (["info", str(run)], ["analyze", str(run)]):
        _refused(capsys, command, "corrupt", steps[0].name, "changed after it was written")


def test_a_listed_file_that_is_missing_fails_info(run, capsys):
    (run / "weights.safetensors").unlink()
    _refused(capsys, ["info", str(run)], "corrupt", "weights.safetensors is missing")


def test_a_full_disk_during_train_names_the_file_and_the_reason(tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk only inside its message; the error still says which file
    could not be written and why, with errno 28, and exits 1 (the work failed, not the input)."""
    import errno

    from safetensors import SafetensorError

    import i2x.store.atomic as atomic

    real_save = atomic.save_file

    def full_disk_for_weights(tensors, filename, metadata=None):
        if "weights" in str(metadata or "") or any(k.startswith("stem") for k in tensors):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(atomic, "save_file", full_disk_for_weights)
    status = main(["train", str(tmp_path / "run"), "--data", "digits", "--epochs", "1", "--train-size", "200",
                   "--probe-size", "20", "--widths", "4,8,16", "--n-prototypes", "4", "--batch-size", "50", "--quiet"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert re.search(r"could not write \S*weights\.safetensors: No space left on device", err), err
    assert f"[Errno {errno.ENOSPC}]" in err and "Errno None" not in err
    assert not list((tmp_path / "run").glob(".i2x-tmp-*"))


# -- every verb explains itself, and errors speak in flags and commands ---------------------------


def test_every_command_has_a_description_and_every_option_its_help():
    import argparse

    from i2x.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = {name: [a.option_strings or [a.dest] for a in p._actions if not a.help]
                    for name, p in sub.choices.items()}
    assert all(sub.choices[name].description for name in sub.choices), \
        [name for name in sub.choices if not sub.choices[name].description]
    assert not any(undocumented.values()), undocumented


def test_an_analyze_option_out_of_range_is_named_by_its_flag(run, capsys):
    assert main(["analyze", str(run), "--min-presence", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--min-presence: expected a number in [0, 1], got 1.5" in err and "min_presence" not in err
    assert main(["analyze", str(run), "--score", "loudest"]) == 2
    err = capsys.readouterr().err
    assert "--score" in err and "uncertainty_score" not in err


def test_a_missing_stage_names_the_command_to_run(run, capsys):
    assert main(["experiment", str(run), "--data", "digits", "--arms", "full", "--seeds", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "`i2x analyze RUN`" in err and "i2x.analysis" not in err


# -- the demo's summary never calls a losing arm best -----------------------------------------------


def _summary(against: dict, seeds: list[int]) -> dict:
    return {"evaluation": {"accuracy": 0.8, "n": 100}, "dataset": "digits", "train_samples": 300, "epochs": 2,
            "pair": {"names": ["a", "b"], "test_confusions": 9, "uncertain": [{"prototype": 1, "score": 0.1}]},
            "targets": {"targets": 5, "pair_samples": 50, "share": 0.1},
            "best_arm": {"arm": "curated->full", "pair_confusions_mean": 88.0, "seeds": seeds, "against": against,
                         "beats_controls": i2x.apps.demo._beats(against)}}


def test_an_arm_worse_than_its_control_is_not_called_best():
    import i2x.apps.demo

    worse = {"full->full": {"pair_confusions": {"mean": 1.0, "lo": -75.2, "hi": 77.2}}}
    line = i2x.apps.demo.summary_lines(_summary(worse, [0, 1]))[-1]
    assert line.startswith("no arm won") and "best arm" not in line
    assert "88.0 test pair confusions" in line and "2 seeds, 95% t-intervals" in line


def test_one_seed_says_it_has_no_interval_and_wins_nothing():
    import i2x.apps.demo

    one = {"full->full": {"pair_confusions": {"mean": -3.0, "lo": None, "hi": None}}}
    line = i2x.apps.demo.summary_lines(_summary(one, [0]))[-1]
    assert line.startswith("no arm won") and "one seed: no interval" in line and "t-interval" not in line


def test_an_arm_that_beats_every_control_is_best():
    import i2x.apps.demo

    wins = {"full->full": {"pair_confusions": {"mean": -9.0, "lo": -12.0, "hi": -6.0}},
            "random->full": {"pair_confusions": {"mean": -8.0, "lo": -11.0, "hi": -1.5}}}
    line = i2x.apps.demo.summary_lines(_summary(wins, [0, 1, 2]))[-1]
    assert line.startswith("best arm      curated->full: 88.0 test pair confusions")
    loses_one = dict(wins, **{"hard->full": {"pair_confusions": {"mean": -1.0, "lo": -4.0, "hi": 2.0}}})
    assert i2x.apps.demo.summary_lines(_summary(loses_one, [0, 1, 2]))[-1].startswith("no arm won")


def test_an_arm_refused_for_the_plain_held_out_images_is_named_and_the_model_kept():
    """An arm that won on held-out images with the counterfactual copies but was no better than
    full->full on the plain held-out images is refused by the recommendation: the line says keep
    the model, and names the arm with its plain held-out difference."""
    import i2x.apps.demo

    wins = {"full->full": {"pair_confusions": {"mean": -9.0, "lo": -12.0, "hi": -6.0}}}
    summary = _summary(wins, [0, 1, 2])
    summary["best_arm"].update(recommended=False, validation_size=2000, counterfactual_size=300,
                               refused={"transplanted->full": {"mean": 4.3, "lo": 2.9, "hi": 5.8}})
    line = i2x.apps.demo.summary_lines(summary)[-1]
    assert line.startswith("no arm won    the copies favoured an arm no better than full->full on the 2000 "
                           "plain held-out images (transplanted->full +4.3 [+2.9, +5.8]): keep the model")
    assert "2000 held-out training images + 300 counterfactual copies" not in line
    summary["best_arm"]["refused"] = {}  # nothing refused: the plain no-winner line
    assert i2x.apps.demo.summary_lines(summary)[-1].startswith(
        "no arm won    none beat the controls on 2000 held-out training images + 300 counterfactual copies")


# -- under load: the command line's threads ------------------------------------------------------


def test_cli_threads_follow_the_idle_cores_and_leave_the_users_settings(monkeypatch):
    import os

    from i2x._internal import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(threads, "idle_cores", lambda: 1.02)  # a neighbour keeps one of two cores busy
    env: dict = {}
    assert threads.configure_cli_threads(env) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    monkeypatch.setattr(threads, "idle_cores", lambda: 1.9)  # alone: nothing changes
    env = {}
    assert threads.configure_cli_threads(env) == {} and env == {}
    monkeypatch.setattr(threads, "idle_cores", lambda: 0.0)  # both cores busy: still one thread
    env = {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's wait policy wins
    assert threads.configure_cli_threads(env) == {"OMP_NUM_THREADS": "1"} and env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {"OMP_NUM_THREADS": "2"}  # and so does the user's thread count
    assert threads.configure_cli_threads(env) == {} and env == {"OMP_NUM_THREADS": "2"}


def test_idle_cores_reads_the_machine():
    from i2x._internal.threads import idle_cores

    idle = idle_cores(0.05)
    import os

    if os.path.exists("/proc/stat"):
        assert idle is not None and 0.0 <= idle <= os.cpu_count()
