"""What tracking costs: one recorded checkpoint against a plain inference pass, tracking inside a
real Fashion-MNIST training run, and prototype discovery against scikit-learn.

    python -P benchmarks/bench_tracking.py record   [--probe 10000] [--repeats 7]
    python -P benchmarks/bench_tracking.py training [--epochs 10] [--probe 10000] [--checkpoints 12]
    python -P benchmarks/bench_tracking.py prototypes [--repeats 3]
    python -P benchmarks/bench_tracking.py all --write benchmarks/RESULTS.md
    pytest benchmarks/bench_tracking.py --benchmark-only          (pytest-benchmark view)

record: ``i2x.track.record_checkpoint`` (raw GradCAM grid of the true class + softmax, eval mode)
against ``model(x)`` + softmax in ``torch.no_grad()`` over the same probe images, same batch size,
same model; interleaved rounds, medians, the ratio from this one run.

training: the small ResNet trained on Fashion-MNIST (Adam, batch 128) with an online
``i2x.Tracker`` over a stratified probe set. The tracker's time (``tracker.step`` calls that
recorded, plus the final record) is measured inside the same run as the training steps, so the
overhead is a ratio of two sums from one run: no second training run whose noise would swamp a few
percent.

prototypes: ``i2x.track.prototypes.fit_prototypes`` vs scikit-learn ``KMeans.fit`` + ``predict`` on the
same vectors (``bench_prototypes.py`` has the details).

A probe streamed from a torch Dataset at ImageNet size (20,000 ``FakeData`` images at 224 px,
resnet18 at layer4: peak memory and the record against a plain pass over the same loader) is
``bench_streamed.py``: one case takes most of an hour on 2 cores, so it is a script of its own.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians, machine_line  # noqa: E402

from i2x.explain.explainer import Explainer  # noqa: E402
from i2x.data import load_dataset, make_loader, stratified_subset  # noqa: E402
from i2x.models import build_model  # noqa: E402
from i2x.track import Probe, Tracker, record_checkpoint  # noqa: E402

RECORD_GOAL = 1.15
TRAINING_GOAL = 0.10


def _fashion(train: bool = True):
    return load_dataset("fashion-mnist", train=train)


def _probe_images(n: int):
    data = _fashion()
    idx = stratified_subset(data.labels, n, seed=0)
    return data.images[idx], data.labels[idx]


# ----------------------------------------------------------------------------------------------
# One checkpoint vs a plain inference pass


def plain_inference(model, images, batch_size):
    model.eval()
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            F.softmax(model(images[start:start + batch_size]), 1)


def record_case(probe: int, batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model, layer = build_model("small-resnet", 10, in_channels=1)
    images, labels = _probe_images(probe)
    explainer = Explainer(model, layer)
    # The Tracker's default: BatchNorm statistics recomputed on 512 stratified probe images first.
    calibration = images[stratified_subset(labels, min(512, probe), seed=0)]
    medians = interleaved_medians({
        "plain inference": lambda: plain_inference(model, images, batch_size),
        "i2x record": lambda: record_checkpoint(explainer, images, labels, batch_size=batch_size,
                                                calibration=calibration),
        "i2x record, recalibrate_bn=0": lambda: record_checkpoint(explainer, images, labels, batch_size=batch_size),
    }, repeats=repeats)
    plain = medians["plain inference"]
    return {"probe": probe, "batch": batch_size, "plain": plain, "record": medians["i2x record"],
            "ratio": medians["i2x record"] / plain, "record_nobn": medians["i2x record, recalibrate_bn=0"],
            "ratio_nobn": medians["i2x record, recalibrate_bn=0"] / plain}


# ----------------------------------------------------------------------------------------------
# Tracking during a real training run


def training_case(epochs: int, probe: int, checkpoints: int, batch_size: int = 128, train_size: int | None = None) -> dict:
    torch.manual_seed(0)
    data = _fashion()
    if train_size is not None:
        data = data.subset(stratified_subset(data.labels, train_size, seed=1))
    model, layer = build_model("small-resnet", 10, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = make_loader(data, batch_size=batch_size, shuffle=True, seed=0, drop_last=True)
    planned = epochs * len(loader)
    probe_set = Probe.from_dataset(_fashion(), size=probe, seed=0)
    run_dir = Path(tempfile.mkdtemp(prefix="i2x-bench-")) / "run"
    tracker = Tracker(model, layer, probe_set, run_dir, planned_steps=planned, n_checkpoints=checkpoints,
                      batch_size=512)
    train_s = track_s = 0.0
    step = 0
    for _ in range(epochs):
        for x, y in loader:
            t0 = time.perf_counter()
            model.train()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            t1 = time.perf_counter()
            step += 1
            tracker.step(step)
            t2 = time.perf_counter()
            train_s += t1 - t0
            track_s += t2 - t1
    t0 = time.perf_counter()
    store = tracker.finish(step, prototypes=False)
    track_s += time.perf_counter() - t0
    steps, _, probs = store.load_all()
    test = _fashion(train=False)
    model.eval()
    with torch.no_grad():
        acc = statistics.fmean((model(test.images[i:i + 1000]).argmax(1) == test.labels[i:i + 1000]).float().mean().item()
                               for i in range(0, len(test.labels), 1000))
    return {"epochs": epochs, "steps": step, "train_size": len(data.labels), "probe": probe, "checkpoints": len(steps),
            "train_s": train_s, "track_s": track_s, "overhead": track_s / train_s, "test_acc": acc,
            "per_checkpoint_s": track_s / len(steps)}


# ----------------------------------------------------------------------------------------------
# Tables


def _record_lines(r: dict) -> list[str]:
    met = "met" if r["ratio"] <= RECORD_GOAL else "MISSED"
    met_nobn = "met" if r["ratio_nobn"] <= RECORD_GOAL else "MISSED"
    return [
        "| probe | batch | plain inference s | i2x record s (default, BN recalibration on 512) | ratio (goal <= 1.15) "
        "| i2x record s, recalibrate_bn=0 | ratio |",
        "|---|---|---|---|---|---|---|",
        f"| {r['probe']} | {r['batch']} | {r['plain']:.3f} | {r['record']:.3f} | {r['ratio']:.3f} ({met}) | "
        f"{r['record_nobn']:.3f} | {r['ratio_nobn']:.3f} ({met_nobn}) |",
    ]


def _training_lines(r: dict) -> list[str]:
    met = "met" if r["overhead"] <= TRAINING_GOAL else "MISSED"
    return [
        "| epochs | train samples | steps | probe | checkpoints | training s | tracking s | per checkpoint s "
        "| overhead (goal <= 10%) | test accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['epochs']} | {r['train_size']} | {r['steps']} | {r['probe']} | {r['checkpoints']} | {r['train_s']:.1f} | "
        f"{r['track_s']:.1f} | {r['per_checkpoint_s']:.2f} | {r['overhead']:.1%} ({met}) | {r['test_acc']:.4f} |",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["record", "training", "prototypes", "all"])
    parser.add_argument("--probe", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=512, help="probe batch size of the record case")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--checkpoints", type=int, default=12)
    parser.add_argument("--train-size", type=int, default=None, help="stratified training subset (default: all 60k)")
    parser.add_argument("--write", type=Path, help="append the tables to this Markdown file")
    args = parser.parse_args(argv)
    parts = [f"\n### Tracking on cpu, {datetime.date.today().isoformat()}\n",
             f"Machine: {machine_line('cpu')}. Model: i2x small-resnet (widths 16/32/64, layer3 7x7 at 28 px), "
             f"Fashion-MNIST (Debian dataset-fashion-mnist).\n"]
    if args.what in ("record", "all"):
        r = record_case(args.probe, args.batch, args.repeats)
        parts += [f"\nOne checkpoint vs plain inference, medians of {args.repeats} interleaved rounds. Command: "
                  f"`python -P benchmarks/bench_tracking.py record --probe {args.probe} --batch {args.batch} "
                  f"--repeats {args.repeats}`\n", *_record_lines(r)]
        print("\n".join(_record_lines(r)), flush=True)
    if args.what in ("training", "all"):
        r = training_case(args.epochs, args.probe, args.checkpoints, train_size=args.train_size)
        cmd = f"python -P benchmarks/bench_tracking.py training --epochs {args.epochs} --probe {args.probe} " \
              f"--checkpoints {args.checkpoints}" + (f" --train-size {args.train_size}" if args.train_size else "")
        parts += [f"\nTracking inside training (Adam 2e-3, batch 128, log-spaced schedule + final). Command: `{cmd}`\n",
                  *_training_lines(r)]
        print("\n".join(_training_lines(r)), flush=True)
    if args.what in ("prototypes", "all"):
        from bench_prototypes import discovery_table, format_table

        rows = discovery_table(args.repeats if args.what == "prototypes" else 3)
        parts += ["\nPrototype discovery (see bench_prototypes.py). Command: "
                  "`python -P benchmarks/bench_tracking.py prototypes`\n", format_table(rows)]
        print(format_table(rows), flush=True)
    text = "\n".join(parts) + "\n"
    if args.write:
        with open(args.write, "a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


# ----------------------------------------------------------------------------------------------
# pytest-benchmark view

try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def record_setup():
        torch.manual_seed(0)
        model, layer = build_model("small-resnet", 10, in_channels=1)
        images, labels = _probe_images(2048)
        return model, Explainer(model, layer), images, labels

    @pytest.mark.parametrize("contender", ["plain inference", "i2x record"])
    def test_record_checkpoint(benchmark, record_setup, contender):
        model, explainer, images, labels = record_setup
        benchmark.group = "one checkpoint, 2048 Fashion-MNIST probe images, small-resnet"
        if contender == "plain inference":
            benchmark.pedantic(lambda: plain_inference(model, images, 512), rounds=5, warmup_rounds=1)
        else:
            benchmark.pedantic(lambda: record_checkpoint(explainer, images, labels, batch_size=512), rounds=5,
                               warmup_rounds=1)


if __name__ == "__main__":
    raise SystemExit(main())
