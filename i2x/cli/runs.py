"""``i2x track`` (post hoc over saved checkpoints), ``i2x analyze`` (stages 3-8) and ``i2x info``
(what a run holds, or what this i2x build is)."""

from __future__ import annotations

import argparse
from pathlib import Path

from i2x.cli.common import (
    COMMON,
    DATA_HELP,
    add_memory_budget,
    device_name,
    emit,
    finite_float,
    int_list,
    non_negative_int,
    positive_float,
    positive_int,
)


def register(sub) -> None:
    track = sub.add_parser("track", parents=[COMMON],
                           help="record a folder of saved checkpoints into a run (resumable)",
                           description="Stages 1-2 post hoc: explain a probe set of the dataset with every saved "
                                       "checkpoint of the folder (oldest first), then find the prototypes of the "
                                       "last one. Resumable: finished checkpoints are skipped.")
    track.add_argument("--run", required=True, type=Path, help="the run folder (created, or resumed)")
    track.add_argument("--checkpoints", required=True, type=Path,
                       help="folder of weights files; the step is the last number in each name")
    track.add_argument("--dataset", required=True, help=DATA_HELP)
    track.add_argument("--data-root", type=Path, default=None, help="dataset folder in torchvision's layout")
    track.add_argument("--split", choices=["train", "test"], default="train", help="probe split (default train)")
    track.add_argument("--model", required=True, help="small-resnet or resnet50")
    track.add_argument("--widths", type=int_list, default=None, help="small-resnet stage widths, e.g. 16,32,64")
    track.add_argument("--layer", default=None, help="target layer (default: the model's)")
    track.add_argument("--probe-size", type=positive_int, default=10_000, help="stratified probe size (default 10000)")
    track.add_argument("--probe-seed", type=int, default=0, help="seed of the probe's stratified draw")
    track.add_argument("--batch-size", type=positive_int, default=None,
                       help="probe images per explain batch (default: as many as --memory-budget holds, at most 256)")
    add_memory_budget(track)
    track.add_argument("--method", default="gradcam",
                       help="gradcam, gradcam++, xgradcam, layercam or hirescam (default gradcam)")
    track.add_argument("--recalibrate-bn", type=non_negative_int, default=512,
                       help="probe images for BatchNorm recalibration before each record (0: off)")
    track.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    track.add_argument("--no-prototypes", action="store_true", help="skip prototype discovery")
    track.add_argument("--n-prototypes", type=positive_int, default=32, help="prototypes to find (default 32)")
    track.add_argument("--pca-dim", type=positive_int, default=64,
                       help="dimensions the layer features are reduced to before k-means (default 64)")
    track.add_argument("--prototype-seed", type=int, default=0, help="seed of k-means")
    track.set_defaults(handler=_track)

    analyze = sub.add_parser("analyze", parents=[COMMON],
                             help="stages 3-8: beta^t, groups, timeline, uncertain prototypes, shortcuts",
                             description="Stages 3-8 on a tracked run: how each prototype moved each class over "
                                         "training (beta^t), the classes' groups, shared and specialised "
                                         "prototypes, when each pair of classes separated, and the uncertain and "
                                         "decisive prototypes of the most confused pairs, and the model-wide "
                                         "shortcut reading (per class, the one-sided prototypes the model leans "
                                         "on). Writes analysis.json and analysis.safetensors into the run "
                                         "(docs/analysis.md). Options left out "
                                         "keep the defaults.")
    analyze.add_argument("run", type=Path, help="the run folder (made by i2x train, i2x track or i2x.Tracker)")
    analyze.add_argument("--ridge-lambda", type=positive_float, help="ridge penalty of the beta regressions (1.0)")
    analyze.add_argument("--n-pairs", type=non_negative_int, help="most confused pairs to read (3)")
    analyze.add_argument("--score", dest="uncertainty_score",
                         help="the uncertainty score: swing, sign_changes or cancellation (swing)")
    analyze.add_argument("--regression", dest="uncertainty_regression",
                         help="the regression the score reads: pair, pooled or class_a (pair)")
    analyze.add_argument("--presence", dest="uncertainty_presence",
                         help="how presence in a pair is read: both_classes or pair_share (both_classes)")
    analyze.add_argument("--min-presence", type=finite_float,
                         help="share of a pair's samples a prototype must be present in, 0-1 (0.1)")
    analyze.add_argument("--flag-fraction", type=finite_float,
                         help="flag prototypes scoring at least this fraction of the top score, 0-1 (0.5)")
    analyze.add_argument("--shared-presence", type=finite_float,
                         help="presence in a class above which a prototype is shared, 0-1 (0.5)")
    analyze.add_argument("--separation-threshold", type=finite_float,
                         help="confusion share below which a pair counts as separated, 0-1 (0.05)")
    analyze.add_argument("--shortcut-threshold", type=_otsu_or_fraction,
                         help="cut of the model-wide shortcut reading: 'otsu' (Otsu's split of the candidates' "
                              "scores) or a fraction of the top score, 0-1 (otsu)")
    analyze.add_argument("--shortcut-ranked", type=non_negative_int, default=5,
                         help="best shortcut candidates to print, flagged or not (5; 0: none)")
    analyze.set_defaults(handler=_analyze)

    info = sub.add_parser("info", parents=[COMMON], help="what a run folder holds (without RUN: this i2x build)",
                          description="What a run folder holds, after checking every file it lists (present, inside "
                                      "the folder, unchanged since it was written): a corrupt run exits with status 2. "
                                      "Without RUN: how this i2x was built.")
    info.add_argument("run", type=Path, nargs="?", default=None, help="the run folder (left out: this build)")
    info.set_defaults(handler=_info)


def _track(args) -> int:
    from i2x.data import load_dataset
    from i2x.models import build_model
    from i2x.track import Probe, track_checkpoints

    dataset = load_dataset(args.dataset, root=args.data_root, train=args.split == "train")
    options = {"widths": args.widths} if args.widths else {}
    model, default_layer = build_model(args.model, len(dataset.classes), in_channels=dataset.images.shape[1], **options)
    if args.device:
        model = model.to(args.device)
    probe = Probe.from_dataset(dataset, size=min(args.probe_size, len(dataset.labels)), seed=args.probe_seed)
    prototypes = False if args.no_prototypes else {
        "n_prototypes": args.n_prototypes, "pca_dim": args.pca_dim, "seed": args.prototype_seed}
    store = track_checkpoints(
        model, args.layer or default_layer, probe, args.checkpoints, args.run, prototypes=prototypes,
        batch_size=args.batch_size, method=args.method, device=args.device, model_name=args.model,
        recalibrate_bn=args.recalibrate_bn, progress=True, memory_budget=args.memory_budget,
    )
    assert store is not None  # one process: it is rank 0, which holds the run
    data = {"run": str(store.path), "checkpoints": store.finished_steps(), "prototypes": store.has("prototypes")}
    emit(args, data, f"i2x: run {store.path}: checkpoints {store.finished_steps()}, prototypes "
                     f"{'yes' if store.has('prototypes') else 'no'}")
    return 0


def _analyze(args) -> int:
    from i2x.analysis import analyze

    names = ("ridge_lambda", "n_pairs", "uncertainty_score", "uncertainty_regression", "uncertainty_presence",
             "min_presence", "flag_fraction", "shared_presence", "separation_threshold", "shortcut_threshold")
    options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    result = analyze(args.run, **options)
    pairs = [{"pair": e["pair"], "names": e["names"], "confusions": e["hard_confusions"],
              "flagged": [{"prototype": f["prototype"], "score": f["score"]} for f in e["flagged"]]}
             for e in result.data["uncertainty"]]

    def text() -> str:
        lines = [f"i2x: analysis of {args.run} written ({len(result.steps)} checkpoints, "
                 f"{result.data['num_prototypes']} prototypes)"]
        for entry in result.data["uncertainty"]:
            a, b = entry["names"]
            flagged = ", ".join(f"{f['prototype']} (U={f['score']:.3g})" for f in entry["flagged"]) or "none"
            lines.append(f"  {a} vs {b}: {entry['hard_confusions']} confusions; uncertain prototypes: {flagged}")
        return "\n".join(lines + _shortcut_lines(reading, args.shortcut_ranked))

    reading = result.shortcuts or {}
    shortcuts = {"rule": reading.get("rule"), "threshold": reading.get("threshold"),
                 "per_class": [{"class": e["class"], "name": e["name"],
                                "flagged": [_evidence(p) for p in e["flagged"]]} for e in reading.get("per_class", [])],
                 "ranking": [_evidence(p) for p in reading.get("ranking", [])[:args.shortcut_ranked]]}
    emit(args, {"run": str(args.run), "checkpoints": len(result.steps),
                "prototypes": result.data["num_prototypes"], "pairs": pairs, "shortcuts": shortcuts}, text)
    return 0


def _otsu_or_fraction(text: str):
    if text == "otsu":
        return text
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected 'otsu' or a number in (0, 1], got {text!r}")
    return value


_EVIDENCE = ("prototype", "class", "score", "presence", "presence_other", "skew", "effect", "one_sided",
             "concentration", "flagged")


def _evidence(p: dict) -> dict:
    return {k: p[k] for k in _EVIDENCE}


def _shortcut_lines(reading: dict, ranked: int) -> list[str]:
    """The model-wide reading as text: per class its flagged prototypes, then the best candidates."""
    if not reading:
        return []
    lines = [f"  shortcut candidates over the whole model ({reading['rule']}, cut S > {reading['threshold']:.3g}; "
             f"{reading['n_flagged']} flagged in {len(reading['classes_flagged'])} classes):"]
    for entry in reading["per_class"]:
        if entry["flagged"]:
            lines.append(f"    {entry['name']}: " + "; ".join(f"prototype {p['prototype']} (S={p['score']:.3g}): "
                                                            f"{p['reason']}" for p in entry["flagged"]))
    if ranked:
        names = {e["class"]: e["name"] for e in reading["per_class"]}
        best = ", ".join(f"{p['prototype']}->{names[p['class']]} {p['score']:.3g}{'*' if p['flagged'] else ''}"
                         for p in reading["ranking"][:ranked])
        lines.append(f"    best candidates (prototype->class score, * flagged): {best}")
    return lines


def _info(args) -> int:
    if args.run is None:
        from i2x._loader import build_info

        info = build_info()
        emit(args, info, lambda: "\n".join(f"{k}: {v}" for k, v in info.items()))
        return 0
    from i2x.store import RunStore

    # Every file the run lists, checked (present, inside the run, the hash it was written with):
    # `i2x info` is how a user asks whether a run folder is sound.
    store = RunStore.open(args.run).verify()
    m = store.manifest
    data = {"run": str(store.path), "model": m["model"], "dataset": m["dataset"], "probe_size": m["probe"]["size"],
            "classes": m["classes"], "grid": m["grid"], "schedule": m["schedule"].get("steps"),
            "finished_checkpoints": store.finished_steps(), "final_step": store.final_step(),
            "stages": sorted(m.get("stages", {}))}
    lines = [f"run {store.path}",
             f"  model {m['model']}  dataset {m['dataset']}",
             f"  {m['probe']['size']} probe samples, {len(m['classes'])} classes, grid {m['grid']}",
             f"  schedule {m['schedule'].get('steps')}",
             f"  finished checkpoints {store.finished_steps()} (final: {store.final_step()})",
             f"  stages: {', '.join(sorted(m.get('stages', {}))) or 'none'}"]
    emit(args, data, "\n".join(lines))
    return 0
