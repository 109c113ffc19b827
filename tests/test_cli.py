"""The ``i2x`` command: track (and resume), analyze, explain, info, and one-line errors.

Truths: the run the command writes equals the Python API's on the same checkpoints; a second
``track`` redoes nothing (file times unchanged); errors exit with status 2 and name the problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import i2x
from i2x.cli import main
from i2x.data import load_dataset
from i2x.models import build_model
from i2x.store import RunStore
from i2x.track import Probe, track_checkpoints

WIDTHS = "4,8,16"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    data = load_dataset("digits")
    torch.manual_seed(0)
    model, _ = build_model("small-resnet", 10, widths=(4, 8, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(1, 4):
        idx = torch.arange(step * 64, step * 64 + 64)
        opt.zero_grad()
        F.cross_entropy(model(data.images[idx]), data.labels[idx]).backward()
        opt.step()
        torch.save(model.state_dict(), folder / f"step-{step}.pt")
    return folder


def _track(run, checkpoints, *extra):
    return main(["track", "--run", str(run), "--checkpoints", str(checkpoints), "--dataset", "digits",
                 "--model", "small-resnet", "--widths", WIDTHS, "--probe-size", "60", "--n-prototypes", "4",
                 "--pca-dim", "8", *extra])


def test_track_analyze_explain_info(tmp_path, checkpoints, capsys):
    run = tmp_path / "run"
    assert _track(run, checkpoints) == 0
    store = RunStore.open(run)
    assert store.finished_steps() == [1, 2, 3] and store.has("prototypes")
    # The same run through the Python API.
    model, _ = build_model("small-resnet", 10, widths=(4, 8, 16))
    probe = Probe.from_dataset(load_dataset("digits"), size=60, seed=0)
    api = track_checkpoints(model, "layer3", probe, checkpoints, tmp_path / "api",
                            prototypes={"n_prototypes": 4, "pca_dim": 8, "seed": 0})
    for step in (1, 2, 3):
        assert torch.equal(store.load_checkpoint(step)["saliency"], api.load_checkpoint(step)["saliency"])
    assert torch.equal(store.read_tensors("prototypes")["assignment"], api.read_tensors("prototypes")["assignment"])

    # Resuming a finished run redoes nothing.
    stamp = (run / "checkpoints" / "step-000000002.safetensors").stat().st_mtime_ns
    assert _track(run, checkpoints) == 0
    assert (run / "checkpoints" / "step-000000002.safetensors").stat().st_mtime_ns == stamp

    capsys.readouterr()
    assert main(["analyze", str(run), "--n-pairs", "2", "--score", "cancellation"]) == 0
    out = capsys.readouterr().out
    assert "analysis of" in out and out.count(" vs ") == 2
    assert json.loads((run / "analysis.json").read_text())["options"]["uncertainty_score"] == "cancellation"

    assert main(["explain", str(run), "5", "--top", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["index"] == 5 and len(answer["positions"]) == 3
    assert main(["explain", str(run), "5"]) == 0
    assert "saliency positions" in capsys.readouterr().out

    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "finished checkpoints [1, 2, 3] (final: 3)" in out and "analysis" in out and "prototypes" in out


def test_errors_are_one_line_with_status_2(tmp_path, checkpoints, capsys):
    assert _track(tmp_path / "run", tmp_path / "nowhere") == 2
    assert "does not exist or is not a folder" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    assert main(["info", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("i2x info: error:") and "is not valid JSON" in err and "Traceback" not in err
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["track", "--run", "x"])  # argparse: missing required options


def test_python_m_i2x_help(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(i2x.__file__).resolve().parents[1])}
    # Run from elsewhere: `-m` puts the working directory first on the path, and the repository
    # root holds the unbuilt source package.
    out = subprocess.run([sys.executable, "-m", "i2x", "--help"], capture_output=True, text=True, env=env, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert all(cmd in out.stdout for cmd in ("track", "analyze", "explain", "info"))
