"""Two builds of i2x side by side on this machine: the installed one and a baseline (e.g. today's
main) installed into a folder of its own. Rounds alternate baseline, current, baseline, ... so
both see the same machine; the table gives each row's median over the rounds and current /
baseline.

    # the baseline: build main's wheel and install it beside the venv's torch
    git worktree add /tmp/main-src main && (cd /tmp/main-src && pip wheel --no-build-isolation --no-deps . -w /tmp/w)
    .venv/bin/pip install --no-deps --target /tmp/i2x-main /tmp/w/i2x-*.whl
    .venv/bin/python benchmarks/compare_builds.py --baseline /tmp/i2x-main --rounds 3

Compared: ``i2x bench MODEL --batch B --json`` (each row's median ms and its ratio to the plain
forward / plain step of the same run) and ``benchmarks/run_ops_table.py --json`` (each op's i2x
median ms and its ratio to the eager composite of the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(cmd: list[str], baseline: Path | None) -> str:
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    # PYTHONPATH puts the baseline's i2x ahead of the venv's; -P keeps the source folder off sys.path.
    env.pop("PYTHONPATH", None)
    if baseline is not None:
        env["PYTHONPATH"] = str(baseline)
    proc = subprocess.run([sys.executable, "-P", *cmd], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def bench_rows(args, baseline: Path | None) -> dict[str, float]:
    out = json.loads(_run(["-m", "i2x", "bench", args.model, "--batch", str(args.batch), "--repeats",
                           str(args.repeats), "--json"], baseline))
    return {row["name"]: row["median_ms"] for row in out["rows"]}


def kernel_rows(args, baseline: Path | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ops.json"
        _run([str(HERE / "run_ops_table.py"), "--no-memory", "--repeats", str(args.repeats), "--json", str(path)],
             baseline)
        rows = json.loads(path.read_text())
    return {f"{r['op']} {r['shape']}": r["i2x_ms"] for r in rows} | {
        f"{r['op']} {r['shape']} (eager)": r["eager_ms"] for r in rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="folder holding the baseline build of i2x")
    parser.add_argument("--current", type=Path, default=None,
                        help="folder holding the build to compare (default: the i2x installed in this environment)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    parser.add_argument("--no-bench", action="store_true", help="skip i2x bench")
    args = parser.parse_args(argv)
    for flag, folder in (("--baseline", args.baseline), ("--current", args.current)):
        if folder is not None and not (folder / "i2x" / "__init__.py").exists():
            parser.error(f"{flag} {folder}: no i2x package in it")
    results: dict[str, dict[str, list[float]]] = {"baseline": {}, "current": {}}
    for rnd in range(args.rounds):
        for name, where in (("baseline", args.baseline), ("current", args.current)):
            rows = {} if args.no_bench else bench_rows(args, where)
            if not args.no_kernels:
                rows |= kernel_rows(args, where)
            for key, value in rows.items():
                results[name].setdefault(key, []).append(value)
            print(f"round {rnd + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)
    print(f"| row | baseline median ms | current median ms | current / baseline |\n|---|---:|---:|---:|")
    for key in results["baseline"]:
        if key not in results["current"]:
            continue
        old, new = statistics.median(results["baseline"][key]), statistics.median(results["current"][key])
        print(f"| {key} | {old:.3f} | {new:.3f} | {new / old:.3f} |")
    print(json.dumps(results), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
