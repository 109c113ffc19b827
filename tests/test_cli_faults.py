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
    assert re.search(r"i2x demo: error: arms: arm 'bogus'", err), err
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
    assert "n_prototypes: 1000000000000 is more than the 980 probe positions" in err
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
