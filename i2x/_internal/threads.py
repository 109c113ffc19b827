"""How many threads a command's torch work should use on a machine that others share.

Measured on a 2-core machine (benchmarks/RESULTS.md, "Under load"): ``i2x demo --quick`` took
22 s alone and 198 s beside one busy single-thread process, 9x for losing half the CPU. Two
things compound. OpenMP's default wait policy spins idle threads, burning the core the busy
neighbour also wants. And every parallel region waits for its slowest thread, which shares a core
with the neighbour. So when the command line finds cores busy at its start, it (1) makes OpenMP
threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``) and (2) starts one thread per idle
core. On an idle machine it changes nothing (the spinning default is the fastest alone). Only where
the user set nothing, and only in the ``i2x`` command: a library must not change the process of the
training loop it runs in.
"""

from __future__ import annotations

import os
import time

__all__ = ["idle_cores", "configure_cli_threads"]


def _cpu_times() -> tuple[int, int] | None:
    """``(idle, total)`` jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return idle, sum(fields[:8])


def idle_cores(sample_seconds: float = 0.25) -> float | None:
    """About how many of this machine's cores were idle over ``sample_seconds`` (None: unknown)."""
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(sample_seconds)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])
    return share * (os.cpu_count() or 1)


def configure_cli_threads(environ=os.environ) -> dict[str, str]:
    """Before torch is imported, on a machine whose cores others keep busy: sleeping OpenMP threads
    and one thread per idle core. Nothing on an idle machine, and never over what the user set.
    Returns what was set."""
    if "OMP_NUM_THREADS" in environ:
        return {}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = idle_cores()
    if idle is None:
        return {}
    # A core counts as ours when at least 3/4 of it was idle: a neighbour that keeps a core busy
    # makes a thread there the straggler every parallel region waits for.
    threads = max(1, min(usable, int(idle + 0.25)))
    if threads >= usable:
        return {}
    chosen = {"OMP_NUM_THREADS": str(threads)}
    if "OMP_WAIT_POLICY" not in environ:
        chosen["OMP_WAIT_POLICY"] = "PASSIVE"
    environ.update(chosen)
    return chosen
