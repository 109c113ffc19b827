"""A probe streamed from a torch Dataset at ImageNet size: memory and time of one recorded checkpoint.

    python -P benchmarks/bench_streamed.py [--probe 20000] [--model resnet18] [--batch 64] [--workers 1]

The probe is torchvision's ``FakeData`` (3 x 224 x 224, ``ToTensor``), a map-style Dataset that
makes each image when asked. ``i2x.Probe.from_dataset`` keeps only its indices and labels, and
``Tracker.record`` reads the images through a DataLoader. Measured in this one process:

- the growth of the peak resident memory (VmHWM, reset through /proc/self/clear_refs) during one
  record, beyond what the process held before it (model, probe indices, torch). The goal is under
  1 GB at 20,000 images.
- the record's time against a plain inference pass (``model(x)`` + softmax under ``no_grad``)
  over the same loader, same batch size and workers, in the same run. The goal is <= 1.15x. The
  record also recomputes BatchNorm statistics on 512 probe images first, the Tracker's default.
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
from i2x.apps.bench import cpu_peak_growth, cpu_memory_check  # noqa: E402

MEMORY_GOAL_MIB = 1024
RECORD_GOAL = 1.15


def _fake(n: int):
    import torchvision

    return torchvision.datasets.FakeData(size=n, image_size=(3, 224, 224), num_classes=10,
                                         transform=torchvision.transforms.ToTensor(), random_offset=0)


def plain_pass(model, images, batch: int) -> None:
    model.eval()
    with torch.no_grad():
        for x in images.batches(batch):
            F.softmax(model(x), 1)


def case(n: int, model_name: str, batch: int, workers: int) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None, num_classes=10).eval()
    started = time.perf_counter()
    probe = i2x.Probe.from_dataset(_fake(n), num_workers=workers)  # FakeData has no .targets: labels read once
    labels_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as run:
        tracker = i2x.Tracker(model, "layer4", probe, run, schedule=[1], batch_size=batch)
        plain_pass(model, probe.images[:batch], batch)  # warm-up: oneDNN's kernels and caches
        timing = {}

        def plain():
            t = time.perf_counter()
            plain_pass(model, probe.images, batch)
            timing["plain"] = time.perf_counter() - t

        plain_growth = cpu_peak_growth(plain)

        def record():
            t = time.perf_counter()
            tracker.step(1)
            timing["record"] = time.perf_counter() - t

        growth = cpu_peak_growth(record)
    return {"probe": n, "model": model_name, "batch": batch, "workers": workers, "labels_s": labels_s,
            "plain_s": timing["plain"], "record_s": timing["record"], "ratio": timing["record"] / timing["plain"],
            "growth_mib": growth / 2**20, "plain_growth_mib": plain_growth / 2**20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", type=int, nargs="+", default=[20_000])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    works, how = cpu_memory_check()
    print(f"Machine: {machine_line('cpu')}. Peak memory: {how}.\n")
    print(f"Command: `python -P benchmarks/bench_streamed.py --probe {' '.join(map(str, args.probe))} --model "
          f"{args.model} --batch {args.batch} --workers {args.workers}`\n")
    print("| probe images | model | batch | workers | labels read s | plain inference s | i2x record s | ratio "
          f"(goal <= {RECORD_GOAL}) | record's peak RSS growth MiB (goal < {MEMORY_GOAL_MIB}) | plain pass's peak RSS "
          "growth MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.probe:
        r = case(n, args.model, args.batch, args.workers)
        print(f"| {r['probe']} | {r['model']} | {r['batch']} | {r['workers']} | {r['labels_s']:.1f} | "
              f"{r['plain_s']:.1f} | {r['record_s']:.1f} | {r['ratio']:.3f} | "
              f"{r['growth_mib']:.0f}{'' if works else ' (n/a: ' + how + ')'} | {r['plain_growth_mib']:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
