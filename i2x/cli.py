"""The ``i2x`` command: track saved checkpoints, analyse a run, explain one sample, show a run.

    i2x track   --run RUN --checkpoints DIR --dataset fashion-mnist --model small-resnet
    i2x analyze RUN [--score swing] [--regression pair] [--n-pairs 3] ...
    i2x explain RUN INDEX [--top 5] [--json]
    i2x info    RUN

``i2x track`` is resumable: run it again on the same folder and only the checkpoints not yet
finished are recorded. Input errors (missing folders, corrupt runs, bad options) print one line
naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="i2x", description="Structured explanations of image classifiers (I2X).")
    sub = parser.add_subparsers(dest="command", required=True)

    track = sub.add_parser("track", help="record a folder of saved checkpoints into a run (resumable)")
    track.add_argument("--run", required=True, type=Path, help="the run folder (created, or resumed)")
    track.add_argument("--checkpoints", required=True, type=Path,
                       help="folder of weights files; the step is the last number in each name")
    track.add_argument("--dataset", required=True, help="fashion-mnist, mnist, cifar10 or digits")
    track.add_argument("--data-root", type=Path, default=None, help="dataset folder in torchvision's layout")
    track.add_argument("--split", choices=["train", "test"], default="train", help="probe split (default train)")
    track.add_argument("--model", required=True, help="small-resnet or resnet50")
    track.add_argument("--widths", type=_int_list, default=None, help="small-resnet stage widths, e.g. 16,32,64")
    track.add_argument("--layer", default=None, help="target layer (default: the model's)")
    track.add_argument("--probe-size", type=int, default=10_000, help="stratified probe size (default 10000)")
    track.add_argument("--probe-seed", type=int, default=0)
    track.add_argument("--batch-size", type=int, default=256)
    track.add_argument("--method", default="gradcam")
    track.add_argument("--recalibrate-bn", type=int, default=512,
                       help="probe images for BatchNorm recalibration before each record (0: off)")
    track.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    track.add_argument("--no-prototypes", action="store_true", help="skip prototype discovery")
    track.add_argument("--n-prototypes", type=int, default=32)
    track.add_argument("--pca-dim", type=int, default=64)
    track.add_argument("--prototype-seed", type=int, default=0)

    analyze = sub.add_parser("analyze", help="stages 3-8: beta^t, groups, timeline, uncertain prototypes")
    analyze.add_argument("run", type=Path)
    analyze.add_argument("--ridge-lambda", type=float)
    analyze.add_argument("--n-pairs", type=int)
    analyze.add_argument("--score", dest="uncertainty_score", help="swing, sign_changes or cancellation")
    analyze.add_argument("--regression", dest="uncertainty_regression", help="pair, pooled or class_a")
    analyze.add_argument("--presence", dest="uncertainty_presence", help="both_classes or pair_share")
    analyze.add_argument("--min-presence", type=float)
    analyze.add_argument("--flag-fraction", type=float)
    analyze.add_argument("--shared-presence", type=float)
    analyze.add_argument("--separation-threshold", type=float)

    explain = sub.add_parser("explain", help="why does probe sample INDEX look where it looks")
    explain.add_argument("run", type=Path)
    explain.add_argument("index", type=int)
    explain.add_argument("--top", type=int, default=5)
    explain.add_argument("--json", action="store_true", help="print JSON instead of text")

    info = sub.add_parser("info", help="what a run folder holds")
    info.add_argument("run", type=Path)
    return parser


def _cmd_track(args) -> int:
    import torch

    from .data import load_dataset
    from .models import build_model
    from .track import Probe, track_checkpoints

    dataset = load_dataset(args.dataset, root=args.data_root, train=args.split == "train")
    options = {"widths": args.widths} if args.widths else {}
    model, default_layer = build_model(args.model, len(dataset.classes), in_channels=dataset.images.shape[1], **options)
    if args.device:
        model = model.to(torch.device(args.device))
    probe = Probe.from_dataset(dataset, size=min(args.probe_size, len(dataset.labels)), seed=args.probe_seed)
    prototypes = False if args.no_prototypes else {
        "n_prototypes": args.n_prototypes, "pca_dim": args.pca_dim, "seed": args.prototype_seed}
    store = track_checkpoints(
        model, args.layer or default_layer, probe, args.checkpoints, args.run, prototypes=prototypes,
        batch_size=args.batch_size, method=args.method, device=args.device, model_name=args.model,
        recalibrate_bn=args.recalibrate_bn, progress=True,
    )
    print(f"i2x: run {store.path}: checkpoints {store.finished_steps()}, prototypes "
          f"{'yes' if store.has('prototypes') else 'no'}")
    return 0


def _cmd_analyze(args) -> int:
    from .analysis import analyze

    names = ("ridge_lambda", "n_pairs", "uncertainty_score", "uncertainty_regression", "uncertainty_presence",
             "min_presence", "flag_fraction", "shared_presence", "separation_threshold")
    options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    result = analyze(args.run, **options)
    print(f"i2x: analysis of {args.run} written ({len(result.steps)} checkpoints, "
          f"{result.data['num_prototypes']} prototypes)")
    for entry in result.data["uncertainty"]:
        a, b = entry["names"]
        flagged = ", ".join(f"{f['prototype']} (U={f['score']:.3g})" for f in entry["flagged"]) or "none"
        print(f"  {a} vs {b}: {entry['hard_confusions']} confusions; uncertain prototypes: {flagged}")
    return 0


def _cmd_explain(args) -> int:
    from .analysis import explain_sample

    answer = explain_sample(args.run, args.index, top=args.top)
    print(json.dumps(answer.to_dict(), indent=2) if args.json else str(answer))
    return 0


def _cmd_info(args) -> int:
    from .store import RunStore

    store = RunStore.open(args.run)
    m = store.manifest
    print(f"run {store.path}")
    print(f"  model {m['model']}  dataset {m['dataset']}")
    print(f"  {m['probe']['size']} probe samples, {len(m['classes'])} classes, grid {m['grid']}")
    print(f"  schedule {m['schedule'].get('steps')}")
    print(f"  finished checkpoints {store.finished_steps()} (final: {store.final_step()})")
    print(f"  stages: {', '.join(sorted(m.get('stages', {}))) or 'none'}")
    return 0


_COMMANDS = {"track": _cmd_track, "analyze": _cmd_analyze, "explain": _cmd_explain, "info": _cmd_info}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, KeyError, IndexError) as e:
        # Errors of input (missing folders, corrupt runs, bad options) as one clear line, not a traceback.
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"i2x {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
