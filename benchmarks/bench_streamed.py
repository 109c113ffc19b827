"""A probe streamed from a torch Dataset at ImageNet size: memory and time of one recorded checkpoint.

    python -P benchmarks/bench_streamed.py [--probe 20000] [--model resnet18 resnet50] [--batch N] [--workers 1]
    python -P benchmarks/bench_streamed.py --fashion [--baseline DIR]
    python -P benchmarks/bench_streamed.py --isolated [--probe 20000] [--model resnet18 resnet50]

With no ``--batch`` the Tracker runs with its DEFAULT settings: the probe batch follows from the
memory budget (256 MiB) and the image and model size (docs/memory.md).

The probe is torchvision's ``FakeData`` (3 x 224 x 224, ``ToTensor``), a map-style Dataset that
makes each image when asked. ``i2x.Probe.from_dataset`` keeps only its indices and labels, and
``Tracker.record`` reads the images through a DataLoader. Measured in this one process:

- the growth of the peak resident memory (VmHWM, reset through /proc/self/clear_refs) during one
  record, beyond what the process held before it (model, probe indices, torch). The goal is under
  512 MiB at 20,000 images with the default settings (it was 1 GB at batch 64).
- the record's time against a plain inference pass (``model(x)`` + softmax under ``no_grad``)
  over the same loader, same batch size and workers, in the same run. The goal is <= 1.1x. The
  record also recomputes BatchNorm statistics on 512 probe images first, the Tracker's default.

``--fashion``: the 28 px case. A Tracker with default settings records a 10,000-image
Fashion-MNIST probe (small-resnet) in this build and, with ``--baseline DIR`` (an i2x installed
with ``pip install --target DIR`` from an older commit), in that one, in alternating rounds, in
separate processes; the table gives the batch each picked and the median times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_line  # noqa: E402

import i2x  # noqa: E402
from i2x.apps.bench import cpu_memory_check, cpu_peak_growth  # noqa: E402

MEMORY_GOAL_MIB = 512
RECORD_GOAL = 1.1


def _fake(n: int):
    import torchvision

    return torchvision.datasets.FakeData(size=n, image_size=(3, 224, 224), num_classes=10,
                                         transform=torchvision.transforms.ToTensor(), random_offset=0)


def plain_pass(model, images, batch: int) -> None:
    model.eval()
    with torch.no_grad():
        for x in images.batches(batch):
            F.softmax(model(x), 1)


def _rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def case(n: int, model_name: str, batch: int | None, workers: int, chunk: int) -> dict:
    """One model: the probe's record against plain passes, interleaved chunk by chunk.

    The machine's speed drifts over minutes, and other work on it comes and goes. So the plain
    pass and the record take turns over the same chunks of the probe, and each sums its own time.
    The record also pays, once, the BatchNorm recalibration on 512 probe images (the Tracker's
    default) and the write of the checkpoint into the run. Memory is the highest resident size
    reached while recording, above the size before the first chunk: a climb from chunk to chunk
    counts too.
    """
    import torchvision

    from i2x.track.batchnorm import recalibrated_batchnorm
    from i2x.track.tracker import record_checkpoint

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None, num_classes=10).eval()
    started = time.perf_counter()
    probe = i2x.Probe.from_dataset(_fake(n), num_workers=workers)  # FakeData has no .targets: labels read once
    labels_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as run:
        tracker = i2x.Tracker(model, "layer4", probe, run, schedule=[1], batch_size=batch)
        batch = tracker.batch_size  # the default's choice, when no batch was given
        plain_pass(model, probe.images[:batch], batch)  # warm-up: oneDNN's kernels and caches
        record_checkpoint(tracker.explainer, probe.images[:batch], probe.labels[:batch], batch_size=batch)
        base = _rss()
        plain_s = record_s = 0.0
        plain_peak = record_peak = 0
        saliency, probs = [], []
        t = time.perf_counter()
        growth = cpu_peak_growth(lambda: recalibrated_batchnorm(model, tracker.calibration, "cpu").__enter__())
        record_s += time.perf_counter() - t
        record_peak = max(record_peak, _rss() - base + growth)
        for start in range(0, n, chunk):
            view, labels = probe.images[start:start + chunk], probe.labels[start:start + chunk]
            before = _rss()
            t = time.perf_counter()
            growth = cpu_peak_growth(lambda v=view: plain_pass(model, v, batch))
            plain_s += time.perf_counter() - t
            plain_peak = max(plain_peak, before - base + growth)
            before = _rss()
            out: dict = {}
            t = time.perf_counter()
            growth = cpu_peak_growth(lambda v=view, y=labels, o=out: o.update(
                r=record_checkpoint(tracker.explainer, v, y, batch_size=batch)))
            record_s += time.perf_counter() - t
            record_peak = max(record_peak, before - base + growth)
            saliency.append(out["r"][0])
            probs.append(out["r"][1])
        t = time.perf_counter()
        assert tracker.store is not None
        tracker.store.write_checkpoint(1, torch.cat(saliency), torch.cat(probs))
        record_s += time.perf_counter() - t
    return {"probe": n, "model": model_name, "batch": batch, "workers": workers, "labels_s": labels_s,
            "plain_s": plain_s, "record_s": record_s, "ratio": record_s / plain_s,
            "growth_mib": record_peak / 2**20, "plain_growth_mib": plain_peak / 2**20}


_ISOLATED = """
import json, sys, tempfile, time, torch, torchvision
sys.path.insert(0, {bench!r})
import bench_streamed as bs
import i2x
from i2x.apps.bench import cpu_peak_growth
torch.manual_seed(0)
model = torchvision.models.get_model({model!r}, weights=None, num_classes=10).eval()
probe = i2x.Probe.from_dataset(bs._fake({n}), num_workers={workers})
with tempfile.TemporaryDirectory() as run:
    tracker = i2x.Tracker(model, "layer4", probe, run, schedule=[1])
    batch = tracker.batch_size
    bs.plain_pass(model, probe.images[:batch], batch)  # warm-up: oneDNN's kernels and caches
    t = time.perf_counter()
    if {mode!r} == "plain":
        growth = cpu_peak_growth(lambda: bs.plain_pass(model, probe.images, batch))
    else:
        growth = cpu_peak_growth(lambda: tracker.step(1))
    print(json.dumps({{"batch": batch, "calibration_batch": tracker.calibration_batch,
                      "s": time.perf_counter() - t, "growth_mib": growth / 2**20}}))
"""


def isolated(n: int, model_name: str, workers: int, rounds: int = 1) -> dict:
    """The record alone and the plain pass alone, each in a fresh process of its own, so neither
    one's heap counts against the other: ``Tracker.step`` with default settings (batch sizing,
    BatchNorm recalibration on 512 probe images, the record, the checkpoint's write) against
    ``model(x)`` + softmax under ``no_grad`` at the batch the Tracker chose.

    ``rounds`` > 1 alternates the order, record-plain then plain-record (ABBA), so a drift of the
    machine's speed over the minutes each process takes weighs on both alike; the ratio is the
    sum of the records' times over the sum of the plain passes', and each pair's ratio is kept."""
    import json
    import subprocess

    runs: dict[str, list[dict]] = {"record": [], "plain": []}
    for r in range(rounds):
        for mode in (("record", "plain") if r % 2 == 0 else ("plain", "record")):
            code = _ISOLATED.format(bench=str(Path(__file__).resolve().parent), model=model_name, n=n,
                                    workers=workers, mode=mode)
            text = subprocess.run([sys.executable, "-P", "-c", code], check=True, capture_output=True,
                                  text=True).stdout
            runs[mode].append(json.loads(text.strip().splitlines()[-1]))
    record_s = sum(x["s"] for x in runs["record"])
    plain_s = sum(x["s"] for x in runs["plain"])
    return {"probe": n, "model": model_name, "batch": runs["record"][0]["batch"],
            "calibration_batch": runs["record"][0]["calibration_batch"], "workers": workers, "rounds": rounds,
            "plain_s": plain_s / rounds, "record_s": record_s / rounds, "ratio": record_s / plain_s,
            "pair_ratios": [a["s"] / b["s"] for a, b in zip(runs["record"], runs["plain"], strict=True)],
            "growth_mib": max(x["growth_mib"] for x in runs["record"]),
            "plain_growth_mib": max(x["growth_mib"] for x in runs["plain"])}


_FASHION_RECORD = """
import json, tempfile, time, torch, i2x
torch.manual_seed(0)
train = i2x.load_dataset("fashion-mnist")
model, layer = i2x.build_model("small-resnet", 10, in_channels=1)
probe = i2x.Probe.from_dataset(train, size=10_000, seed=0)
with tempfile.TemporaryDirectory() as run:
    tracker = i2x.Tracker(model, layer, probe, run, schedule=[1, 2])
    tracker.step(1)  # warm-up
    t = time.perf_counter()
    tracker.step(2)
    print(json.dumps({"batch": tracker.batch_size, "record_s": time.perf_counter() - t}))
"""


def fashion(baseline: str | None, rounds: int) -> None:
    """The 28 px record with default settings, this build against ``baseline``, alternating."""
    import json
    import os
    import statistics
    import subprocess

    builds = {"this build": None} | ({"baseline": baseline} if baseline else {})
    times: dict[str, list[float]] = {k: [] for k in builds}
    batches: dict[str, int] = {}
    for _ in range(rounds):
        for label, path in builds.items():
            env = dict(os.environ)
            if path:
                env["PYTHONPATH"] = path
            out = subprocess.run([sys.executable, "-P", "-c", _FASHION_RECORD], env=env, check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            times[label].append(r["record_s"])
            batches[label] = r["batch"]
    print(f"| build | default probe batch | record s (median of {rounds}) | ratio to baseline |")
    print("|---|---|---|---|")
    base = statistics.median(times["baseline"]) if baseline else None
    for label in builds:
        med = statistics.median(times[label])
        print(f"| {label} | {batches[label]} | {med:.2f} | {med / base:.3f} |" if base else
              f"| {label} | {batches[label]} | {med:.2f} | - |")


def _header(*middle: str) -> None:
    """The results table's header: probe, model, batch, ``middle``, then the times and memory."""
    columns = ["probe images", "model", "batch", *middle, "plain inference s", "i2x record s",
               f"ratio (goal <= {RECORD_GOAL})", f"record's peak RSS growth MiB (goal < {MEMORY_GOAL_MIB})",
               "plain pass's peak RSS growth MiB"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", type=int, nargs="+", default=[20_000])
    parser.add_argument("--model", nargs="+", default=["resnet18"])
    parser.add_argument("--batch", type=int, default=None, help="probe batch (default: the Tracker's default)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--fashion", action="store_true", help="the 28 px Fashion-MNIST case instead")
    parser.add_argument("--baseline", default=None, help="with --fashion: an older i2x installed into this folder")
    parser.add_argument("--rounds", type=int, default=None,
                        help="--fashion: alternating rounds (default 3); --isolated: record/plain pairs in ABBA "
                             "order (default 1)")
    parser.add_argument("--chunk", type=int, default=2000, help="images per turn of the plain pass and the record")
    parser.add_argument("--isolated", action="store_true",
                        help="the record alone and the plain pass alone, each in a process of its own")
    args = parser.parse_args(argv)
    print(f"Machine: {machine_line('cpu')}.\n")
    print(f"Command: `python -P benchmarks/bench_streamed.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    if args.fashion:
        fashion(args.baseline, args.rounds or 3)
        return 0
    works, how = cpu_memory_check()
    print(f"Peak memory: {how}.\n")
    if args.isolated:
        _header("BatchNorm recalibration batch", "workers", "rounds (each pair's ratio)")
        for model in args.model:
            for n in args.probe:
                r = isolated(n, model, args.workers, args.rounds or 1)
                pairs = ", ".join(f"{x:.3f}" for x in r["pair_ratios"])
                print(f"| {r['probe']} | {r['model']} | {r['batch']} | {r['calibration_batch']} | {r['workers']} | "
                      f"{r['rounds']} ({pairs}) | {r['plain_s']:.1f} | {r['record_s']:.1f} | {r['ratio']:.3f} | "
                      f"{r['growth_mib']:.0f} | {r['plain_growth_mib']:.0f} |", flush=True)
        return 0
    _header("workers", "labels read s")
    for model in args.model:
        for n in args.probe:
            r = case(n, model, args.batch, args.workers, args.chunk)
            print(f"| {r['probe']} | {r['model']} | {r['batch']} | {r['workers']} | {r['labels_s']:.1f} | "
                  f"{r['plain_s']:.1f} | {r['record_s']:.1f} | {r['ratio']:.3f} | "
                  f"{r['growth_mib']:.0f}{'' if works else ' (n/a: ' + how + ')'} | {r['plain_growth_mib']:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
