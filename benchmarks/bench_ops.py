"""pytest-benchmark view of the kernel cases: `pytest benchmarks/bench_ops.py --benchmark-only`.

Each case is timed for i2x and for its eager composite in the same session (group = case), so
pytest-benchmark's comparison table shows the ratio. The printed one-table summary with goals and
memory is `python benchmarks/run_ops_table.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ops_cases import CASES  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def inputs_cache():
    return {}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("contender", ["i2x", "eager"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel(benchmark, inputs_cache, case, contender, device):
    key = (case.name, device)
    if key not in inputs_cache:
        inputs_cache.clear()  # prototype_assign's inputs are 2 GB: keep one case's inputs at a time
        inputs_cache[key] = case.make(device)
    inputs = inputs_cache[key]
    fn = case.i2x if contender == "i2x" else case.eager

    def run():
        with torch.no_grad():
            out = fn(inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{case.name} [{device}]"
    rounds = 3 if case.name == "prototype_assign" else 10
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
