"""Timing helpers shared by the benchmark scripts: contenders interleaved in one run, medians."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: str = "cpu"
) -> dict[str, float]:
    """Median seconds per contender; each round runs every contender once, in turn, so a slow
    phase of the machine hits all of them alike."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_index in range(repeats):
        # Rotate the order every round: a contender that always followed a memory-hungry one would
        # pay for that one's page faults and freed caches.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = contenders[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def paired_overhead(base: Callable[[], object], other: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Median over rounds of other/base - 1, each round timing both back to back (order alternating).

    A ratio within a round cancels the machine's slow drifts, which on a shared 2-core machine are
    larger than the few percent being measured."""
    for _ in range(warmup):
        base()
        other()
    ratios, base_times, other_times = [], [], []
    for round_index in range(repeats):
        pair = [(base, base_times), (other, other_times)]
        for fn, sink in pair if round_index % 2 == 0 else pair[::-1]:
            t0 = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - t0)
        ratios.append(other_times[-1] / base_times[-1])
    return {"base": statistics.median(base_times), "other": statistics.median(other_times),
            "overhead": statistics.median(ratios) - 1, "spread": (min(ratios) - 1, max(ratios) - 1)}


def machine_line(device: str) -> str:
    if device == "cuda":
        what = torch.cuda.get_device_name()
    else:
        what = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    what = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return (f"{what}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(fn: Callable[[], object], interval: float = 0.002) -> int:
    """Peak resident memory during ``fn()`` over the resident memory when it starts, in bytes.

    Sampled from /proc/self/statm by a thread (ru_maxrss proved unreliable here: it lagged and
    read 0 for runs that clearly allocated gigabytes). Spikes shorter than ``interval`` can be
    missed; the contenders measured run for seconds.
    """
    start = _rss_bytes()
    peak = start
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak, _rss_bytes()) - start
