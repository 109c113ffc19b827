"""A run folder written before the package moved into stage folders still opens, analyses,
explains and reports.

The fixture ``tests/fixtures/run-before-folders`` was written by the flat package (commit
22ce468, the last one before the move) with its command line on scikit-learn's digits:
``i2x train RUN --data digits --widths 8,16,32 --epochs 2 --train-size 400 --probe-size 80
--n-prototypes 6``, then ``i2x analyze``, ``i2x curate --data digits`` and ``i2x experiment
--data digits --arms full,curated --seeds 2 --epochs-per-stage 1``. The truths are what that code
stored and printed: its analysis, targets and results files, and ``i2x explain RUN 3 --json``
(``run-before-folders-explain-3.json``). Each test works on a copy: the fixture is never written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import i2x
from i2x.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "run-before-folders"
EXPLAIN_3 = Path(__file__).parent / "fixtures" / "run-before-folders-explain-3.json"


def _close(a, b, rel: float) -> bool:
    """Equal, with floats equal to ``rel``, through nested lists and dicts."""
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture
def run(tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(FIXTURE, copy)
    return copy


def test_the_store_reads_every_stage(run):
    store = i2x.RunStore.open(run)
    assert store.finished_steps() == list(range(1, 9))
    assert store.probe_size == 80 and store.grid == (7, 7)
    protos = i2x.track.read_prototypes(store)
    assert protos.n_prototypes == 6 and list(protos.assignment.shape) == [80, 7, 7]
    analysis = i2x.load_analysis(run)
    assert analysis.data["fingerprints"]["prototypes"] == i2x._internal.hashing.tensor_digest(protos.assignment)
    targets = i2x.load_targets(run)
    assert targets.pair == (1, 8) and len(targets) == 32
    results = i2x.load_results(run)
    assert list(results["arms"]) == ["full", "curated"] and results["config"]["seeds"] == [0, 1]
    assert results["config"]["start_weights"] == i2x._internal.hashing.state_digest(i2x.track.final_model(store).state_dict())


def test_explain_sample_gives_what_the_flat_package_printed(run):
    before = json.loads(EXPLAIN_3.read_text())
    now = json.loads(json.dumps(i2x.explain_sample(run, 3).to_dict()))
    assert now.keys() == before.keys()
    for key in before:
        assert _close(now[key], before[key], 1e-6), key


def test_analysis_again_gives_the_stored_one(run):
    stored = json.loads((run / "analysis.json").read_text())
    again = i2x.analyze(run).data
    for key in ("fingerprints", "per_class", "groups", "timeline", "uncertainty", "class_sizes", "grid"):
        assert _close(json.loads(json.dumps(again[key])), stored[key], 1e-9), key
    tensors = i2x.load_analysis(run).tensors
    assert torch.isfinite(tensors["beta_pooled"]).all()


def test_the_command_line_reads_and_reports_it(run, capsys):
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["finished_checkpoints"] == list(range(1, 9)) and info["probe_size"] == 80
    assert main(["report", str(run), "--quiet"]) == 0
    page = (run / "report" / "index.html").read_text()
    for section in ("overview", "prototypes", "training", "uncertain", "curation", "experiment"):
        assert f'<section id="{section}">' in page
    assert "not run yet" not in page  # every stage the old code ran is shown, none reported missing
