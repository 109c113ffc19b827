"""Times every i2x op against its eager-torch composite in one run and prints one table.

    python benchmarks/run_ops_table.py [--device cpu|cuda] [--repeats 7] [--write benchmarks/RESULTS.md]

Contenders are interleaved (i2x, eager, i2x, eager, ...) after a warm-up, and the table reports
medians and the ratio eager / i2x measured in this run. prototype_assign's peak extra memory is
measured in a fresh subprocess per contender (resident memory sampled on the CPU, max_memory_allocated on CUDA)
over what its inputs already hold. On CUDA the device-to-device copy bandwidth is measured beside
the table, and memory-bound ops report their achieved bandwidth as a share of it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians, machine_line  # noqa: E402
from ops_cases import CASES, CASES_BY_NAME  # noqa: E402

import i2x  # noqa: E402


def time_interleaved(case, device: str, repeats: int, warmup: int = 2) -> dict[str, float]:
    inputs = case.make(device)

    def bind(fn):
        def run():
            with torch.no_grad():
                fn(inputs)

        return run

    result = interleaved_medians({"i2x": bind(case.i2x), "eager": bind(case.eager)}, repeats, warmup, device)
    if case.bytes_moved is not None:
        result["bytes"] = case.bytes_moved(inputs)
    return result


_MEMORY_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from _timing import peak_rss_growth
from ops_cases import CASES_BY_NAME
case = CASES_BY_NAME[sys.argv[2]]
device, which = sys.argv[3], sys.argv[4]
inputs = case.make(device)
fn = case.i2x if which == "i2x" else case.eager

def run():
    with torch.no_grad():
        fn(inputs)
    if device == "cuda":
        torch.cuda.synchronize()

if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    extra = torch.cuda.max_memory_allocated() - base
else:
    extra = peak_rss_growth(run)
print(json.dumps({"extra_bytes": extra}))
"""


def peak_extra_memory(case_name: str, device: str, which: str) -> int:
    here = str(Path(__file__).resolve().parent)
    # -P: the child must import the installed i2x, not the source folder in the working directory.
    out = subprocess.run(
        [sys.executable, "-P", "-c", _MEMORY_CHILD, here, case_name, device, which],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {case_name} ({which}) failed:\n{out.stderr}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"])


def copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = interleaved_medians({"copy": lambda: dst.copy_(src)}, repeats, 1, device)["copy"]
    return 2 * nbytes / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", nargs="*", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    parser.add_argument("--no-memory", action="store_true", help="skip the prototype_assign memory measurement")
    parser.add_argument("--write", type=Path, help="append the table to this Markdown file")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")

    bandwidth = copy_bandwidth(args.device) if args.device == "cuda" else None
    rows = []
    for name in args.cases:
        case = CASES_BY_NAME[name]
        t = time_interleaved(case, args.device, args.repeats)
        ratio = t["eager"] / t["i2x"]
        row = {
            "op": case.name, "shape": case.shape, "i2x_ms": t["i2x"] * 1e3, "eager_ms": t["eager"] * 1e3,
            "speedup": ratio, "goal": case.goal, "met": ratio >= case.goal_speedup, "note": "",
        }
        if bandwidth is not None and "bytes" in t:
            share = t["bytes"] / t["i2x"] / bandwidth
            row["note"] = f"{t['bytes'] / t['i2x'] / 1e9:.0f} GB/s = {share:.0%} of copy"
        if name == "prototype_assign" and not args.no_memory:
            mine = peak_extra_memory(name, args.device, "i2x")
            theirs = peak_extra_memory(name, args.device, "eager")
            row["note"] = f"peak extra memory {mine / 2**20:.0f} MiB vs {theirs / 2**20:.0f} MiB ({mine / theirs:.3f}x)"
            row["met"] = row["met"] and mine * 10 <= theirs
        rows.append(row)
        print(f"{case.name:24s} i2x {row['i2x_ms']:9.3f} ms  eager {row['eager_ms']:9.3f} ms  "
              f"x{ratio:5.2f}  {'met' if row['met'] else 'MISSED'}  {row['note']}", flush=True)

    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    header = "| op | shape | i2x ms | eager ms | eager / i2x | goal | met | note |\n|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['op']} | {r['shape']} | {r['i2x_ms']:.3f} | {r['eager_ms']:.3f} | {r['speedup']:.2f}x | {r['goal']} | "
        f"{'yes' if r['met'] else 'NO'} | {r['note']} |\n"
        for r in rows
    )
    stamp = datetime.date.today().isoformat()
    info = i2x.build_info()
    text = (
        f"\n### Kernels on {args.device}, {stamp}\n\n"
        f"Machine: {machine_line(args.device)}; i2x {info['version']} (cuda={info['cuda']}, openmp={info['openmp']}).\n"
        + (f"Device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s.\n" if bandwidth else "")
        + f"Command: `python benchmarks/run_ops_table.py --device {args.device} --repeats {args.repeats}`; "
        f"medians of {args.repeats} interleaved runs.\n\n" + header + body
    )
    print(text)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
