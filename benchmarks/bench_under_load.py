"""``i2x demo --quick`` alone and beside one busy process, on this machine: how much a neighbour
slows it, and how the OpenMP wait policy changes that.

    python benchmarks/bench_under_load.py [--repeats 1] [--variants default,passive,threads1]

Each run is a fresh ``i2x demo --quick`` in a new folder (the subprocess gets the environment of
its variant; ``default`` is the command as a user types it, with no OMP_* variable set). "Beside
a busy process" starts one single-thread Python busy loop first and stops it after the run.
Prints one table: seconds alone, seconds beside the busy process, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "threads1": {"OMP_NUM_THREADS": "1"},
}
_BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"


def _env(variant: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "I2X_"))}
    env.update(VARIANTS[variant])
    return env


def demo_seconds(variant: str, busy: bool) -> float:
    neighbour = subprocess.Popen([sys.executable, "-c", _BUSY]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-P", "-m", "i2x", "demo", str(Path(tmp) / "demo"), "--quick",
                                   "--no-report", "--quiet"], env=_env(variant), capture_output=True, text=True,
                                  cwd=tmp)
            seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"i2x demo --quick failed ({variant}, busy={busy}):\n{proc.stderr[-2000:]}")
        return seconds
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="default,passive")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    rows = []
    for variant in variants:
        alone = [demo_seconds(variant, busy=False) for _ in range(args.repeats)]
        beside = [demo_seconds(variant, busy=True) for _ in range(args.repeats)]
        a, b = min(alone), min(beside)
        rows.append((variant, a, b))
        print(f"{variant}: alone {a:.1f} s, beside a busy process {b:.1f} s ({b / a:.2f}x)", file=sys.stderr, flush=True)
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print("| environment | alone s | beside one busy process s | ratio |\n|---|---:|---:|---:|")
    for variant, a, b in rows:
        env = ", ".join(f"{k}={v}" for k, v in VARIANTS[variant].items()) or "nothing set"
        print(f"| {variant} ({env}) | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
