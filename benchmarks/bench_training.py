"""What a training epoch costs: i2x's loop (``i2x.loop.training`` / ``i2x.train``) against the loop a
user of the previous main wrote, on the small ResNet and Fashion-MNIST-sized batches.

    python -P benchmarks/bench_training.py [--batches 40] [--repeats 5] [--write benchmarks/RESULTS.md]
    pytest benchmarks/bench_training.py --benchmark-only          (pytest-benchmark view)

baseline ("main"): ``make_loader`` batches, float32, NCHW, SGD with momentum, batch 128: what the
tracking benchmark and the end-to-end tests train with. i2x: the same model, data, optimiser and
batch through ``i2x.loop.training.fit`` (channels-last on the CPU, bfloat16 autocast where the CPU has
native bf16). Each round trains ``--batches`` batches with each contender from the same weights,
interleaved; the ratio of the medians is from this one run, and the epoch figure is the median
per-batch time x the batches of a 60,000-image epoch. Precision ``fp32`` and channels-last alone
are timed too, so the table shows where the speed comes from.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians, machine_line  # noqa: E402

import i2x  # noqa: E402
from i2x.data import ImageDataset, make_loader  # noqa: E402
from i2x.loop.training import fit, resolve_precision  # noqa: E402

EPOCH = 60_000
BATCH = 128
GOAL = 2.0


def _data(n: int) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g),
                        [str(c) for c in range(10)], "synthetic", "train")


def _baseline(model, data):
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
    model.train()
    for x, y in make_loader(data, batch_size=BATCH, shuffle=True, seed=0):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def contenders(batches: int):
    data = _data(batches * BATCH)
    torch.manual_seed(0)
    start, _ = i2x.build_model("small-resnet", num_classes=10)
    fresh = lambda: copy.deepcopy(start)  # noqa: E731
    return {
        "main (fp32, NCHW)": lambda: _baseline(fresh(), data),
        "i2x fp32 + channels-last": lambda: fit(fresh(), data, 1, 0.005, batch_size=BATCH, precision="fp32",
                                                channels_last=True),
        "i2x (auto precision)": lambda: fit(fresh(), data, 1, 0.005, batch_size=BATCH, precision="auto"),
    }


def run(batches: int, repeats: int) -> tuple[str, float]:
    medians = interleaved_medians(contenders(batches), repeats=repeats)
    base = medians["main (fp32, NCHW)"]
    per_epoch = -(-EPOCH // BATCH) / batches
    auto = resolve_precision("auto", torch.device("cpu"))
    lines = [f"Training epoch of the small ResNet (60,000 images of 1x28x28, batch {BATCH}, SGD); {batches} batches "
             f"per round, {repeats} interleaved rounds; auto precision here = {auto}.", "",
             "| loop | s / epoch | speed-up vs main |", "|---|---|---|"]
    for name, t in medians.items():
        lines.append(f"| {name} | {t * per_epoch:.1f} | {base / t:.2f}x |")
    ratio = base / medians["i2x (auto precision)"]
    lines += ["", f"Goal >= {GOAL:.0f}x: {'met' if ratio >= GOAL else 'missed'} ({ratio:.2f}x)."]
    return "\n".join(lines), ratio


def test_training_epoch(benchmark):
    c = contenders(8)
    benchmark.pedantic(c["i2x (auto precision)"], rounds=3, iterations=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write", type=Path)
    args = p.parse_args()
    table, _ = run(args.batches, args.repeats)
    header = f"Machine: {machine_line('cpu')}; {datetime.date.today()}; `python -P benchmarks/bench_training.py`"
    print(header + "\n\n" + table)
    if args.write:
        with open(args.write, "a") as fh:
            fh.write(f"\n## Training loop (bench_training.py)\n{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
