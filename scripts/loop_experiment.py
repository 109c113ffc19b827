"""The closed loop on Fashion-MNIST, end to end: train the small ResNet with an online Tracker,
prototypes, analysis, targets, then the experiment (arms x seeds), and the published files.

    python scripts/loop_experiment.py --out runs/fmnist --publish docs/results/fashion-mnist
    python scripts/loop_experiment.py --shortcut --out runs/shortcut --publish docs/results/fashion-mnist-shortcut

``--labels`` runs the label diagnosis (``i2x.analysis.labels.diagnose_labels`` over every training image) on the
pair and adds the ``cleaned->full`` arm: the pair's likely mislabelled images dropped for one
epoch, then a full epoch, in the same paired experiment as the other arms.

``--shortcut`` plants a bright 4 x 4 mark in the top-left corner of 80% of the training Shirts and
5% of the T-shirts, and of 50% of both classes' test images (independent of the class), trains a
``clean`` model on the unmarked training set with the same recipe, and adds the ``oracle->full``
and ``clean`` arms. Every stage is resumable: a second call reuses what the first finished.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import i2x
from i2x.analysis.labels import diagnose_labels
from i2x.loop.experiments import ALL_ARMS
from i2x.loop.planted import plant_mark
from i2x.loop.targets import known_targets

PAIR = (0, 6)  # T-shirt/top, Shirt


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _build(args, train, **extra):
    options = {"small_input": True} if args.model == "resnet50" and args.small_input else {}
    return i2x.build_model(args.model, num_classes=train.num_classes, in_channels=train.image_shape[0],
                           **options, **extra)


def train_tracked(args, run_dir: Path, train, epochs: int, probe_size: int, n_prototypes: int, seed: int = 0):
    """The base model: trained with an online Tracker, prototypes fitted, weights kept in the run."""
    torch.manual_seed(seed)
    model, layer = _build(args, train)
    model.to(args.device)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    if (run_dir / "weights.safetensors").exists():
        model.load_state_dict(i2x.RunStore.open(run_dir).read_weights())
        _log(f"base model: reused {run_dir / 'weights.safetensors'}")
        return model, layer, init
    probe = i2x.Probe.from_dataset(train, size=probe_size, seed=0)
    steps = epochs * -(-len(train) // 128)
    tracker = i2x.Tracker(model, layer, probe, run_dir, planned_steps=steps)
    started = time.perf_counter()
    stats = i2x.train(model, train, epochs, lr=args.lr, batch_size=args.batch_size, tracker=tracker, seed=seed)
    tracker.finish(stats.steps, prototypes={"n_prototypes": n_prototypes}, save_weights=True)
    _log(f"base model: {epochs} epochs + tracking + prototypes in {time.perf_counter() - started:.0f} s")
    return model, layer, init


def train_plain(args, path: Path, init: dict, train, epochs: int, seed: int = 0, **build):
    """The same recipe without tracking (the clean and the ceiling models), cached in ``path``."""
    model, _ = _build(args, train, **build)
    if init is not None:
        model.load_state_dict(init)
    model.to(args.device)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model
    started = time.perf_counter()
    i2x.train(model, train, epochs, lr=args.lr, batch_size=args.batch_size, seed=seed)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    _log(f"{path.name}: {epochs} epochs in {time.perf_counter() - started:.0f} s")
    return model


def main() -> None:
    global PAIR  # the pair the helpers below read; --pair sets it
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--publish", type=Path, help="write PUBLISH.json and PUBLISH.md (docs/results/...)")
    p.add_argument("--shortcut", action="store_true")
    p.add_argument("--data", default="fashion-mnist", help="a dataset name of i2x.load_dataset")
    p.add_argument("--data-root", default=None)
    p.add_argument("--size", type=int, default=None, help="resize the images (e.g. 224 for ImageNet-style models)")
    p.add_argument("--pair", type=int, nargs=2, default=list(PAIR), metavar=("A", "B"))
    p.add_argument("--model", default="small-resnet", choices=list(i2x.models.MODEL_NAMES))
    p.add_argument("--small-input", action="store_true", help="resnet50: 3x3 stem, no max-pool (layer4 4x4 at 32 px)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lr", type=float, default=0.05, help="training learning rate (fine-tuning: 0.1x)")
    p.add_argument("--only-ceiling", action="store_true", help="train and evaluate the ceiling models only")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-size", type=int, default=0, help="a stratified subset of the training set (0: all)")
    p.add_argument("--test-size", type=int, default=0)
    p.add_argument("--probe", type=int, default=3000)
    p.add_argument("--prototypes", type=int, default=32)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--arms", default="all")
    p.add_argument("--labels", action="store_true",
                   help="diagnose the pair's labels (cleanlab, all training images) and add the cleaned->full arm")
    p.add_argument("--name", default="experiment", help="the experiment's folder in the run")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ceiling", action="store_true", help="also train 4x longer and a 2x wider model (one seed)")
    p.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a find_targets option (repeatable), e.g. weight=margin")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    PAIR = tuple(sorted(args.pair))
    train = i2x.load_dataset(args.data, root=args.data_root, size=args.size)
    test = i2x.load_dataset(args.data, root=args.data_root, train=False, size=args.size)
    if args.train_size:
        train = train.subset(i2x.data.stratified_subset(train.labels, args.train_size, seed=0))
    if args.test_size:
        test = test.subset(i2x.data.stratified_subset(test.labels, args.test_size, seed=0))
    clean_train = train
    planted = None
    if args.shortcut:
        planted = plant_mark(train, {PAIR[1]: 0.8, PAIR[0]: 0.05}, seed=0)
        train = planted.dataset
        test = plant_mark(test, {PAIR[0]: 0.5, PAIR[1]: 0.5}, seed=1).dataset

    if args.only_ceiling:
        torch.manual_seed(0)
        init = _build(args, clean_train)[0].state_dict()
        print(json.dumps(_ceiling(args, init, clean_train, test), indent=1))
        return
    run_dir = args.out / "run"
    model, layer, init = train_tracked(args, run_dir, train, args.epochs, args.probe, args.prototypes)
    store = i2x.RunStore.open(run_dir)
    if not (run_dir / "analysis.json").exists():
        i2x.analyze(run_dir, pairs=[list(PAIR)])
    analysis = i2x.load_analysis(run_dir)
    entry = analysis.uncertainty(*PAIR)
    _log(f"analysis: most confused {[u['pair'] for u in analysis.data['uncertainty']]}; pair {PAIR}: ambivalent "
         f"{analysis.uncertain_prototypes(*PAIR)}, decisive {analysis.decisive_prototypes(*PAIR)}")

    options = {}
    for item in args.target_option:
        key, _, value = item.partition("=")
        options[key] = float(value) if value.replace(".", "", 1).isdigit() else value
    targets = i2x.find_targets(run_dir, model, train, pairs=[PAIR], **options)
    summary = targets.summary()
    shares = ", ".join(f"{v['name']} {100 * v['share']:.1f}%" for v in summary["per_class"].values())
    _log(f"targets: {len(targets)} of {summary['pair_samples']} ({shares}); "
         f"prototypes {[p['prototype'] for p in targets.prototypes]}")
    extra = {"pair_entry": entry, "target_summary": summary}

    oracle = clean = None
    arms = list(ALL_ARMS) if args.arms == "all" else args.arms.split(",")
    if args.labels:
        extra["labels"] = _diagnose(run_dir, model, train)
        if "cleaned->full" not in arms:
            arms.append("cleaned->full")
    if planted is not None:
        pair_marked = planted.marked[targets.indices]
        sel = targets.selected
        tp = int((sel & pair_marked).sum())
        precision = tp / max(1, int(sel.sum()))
        recall = tp / max(1, int(pair_marked.sum()))
        mark_proto = _mark_prototype(store, planted)
        extra["shortcut"] = {"marked_pair_samples": int(pair_marked.sum()), "targets": int(sel.sum()),
                             "precision": precision, "recall": recall, "mark_prototype": mark_proto,
                             "mark_prototype_flagged": mark_proto in [p["prototype"] for p in targets.prototypes]}
        _log(f"shortcut: mark prototype {mark_proto}; targets precision {precision:.3f}, recall {recall:.3f}")
        in_pair = planted.marked.clone()
        in_pair &= (train.labels == PAIR[0]) | (train.labels == PAIR[1])
        rows = in_pair.nonzero().flatten()
        keep = torch.isin(planted.indices, rows)
        oracle = known_targets(train, PAIR, planted.indices[keep], planted.masks[keep], tuple(store.grid),
                               train.classes)
        clean_model = train_plain(args, args.out / "clean.safetensors", init, clean_train, args.epochs)
        clean = ({k: v.clone() for k, v in clean_model.state_dict().items()}, clean_train)
        for arm in ("oracle->full", "clean"):
            if arm not in arms:
                arms.append(arm)

    results = i2x.experiment(run_dir, model, train, test, arms=arms, seeds=args.seeds, targets=targets,
                             oracle=oracle, clean=clean, train_lr=args.lr, batch_size=args.batch_size,
                             device=args.device, log=_log, name=args.name)
    if args.ceiling:
        extra["ceiling"] = _ceiling(args, init, clean_train, test)
    extra["seconds_total"] = time.perf_counter() - began
    extra["experiment_seconds"] = sum(c["seconds"] for a in results["arms"].values() for c in a["seeds"].values())
    (args.out / "extra.json").write_text(json.dumps(extra, indent=1))
    _log(f"done in {extra['seconds_total']:.0f} s (cells {extra['experiment_seconds']:.0f} s)")
    if args.publish:
        publish(args.publish, results, extra, vars(args))


def _diagnose(run_dir: Path, model, train) -> dict:
    """The label diagnosis of the pair (reused when the run holds one): its figures, without the
    full list of positions (the run's labels.json keeps them)."""
    store = i2x.RunStore.open(run_dir)
    if store.has("labels"):
        result = store.read_json("labels")
    else:
        started = time.perf_counter()
        result = diagnose_labels(run_dir, model, train, n_pairs=1, n_images=None)
        result["seconds"] = time.perf_counter() - started
    entry = next(e for e in result["pairs"] if sorted(e["pair"]) == sorted(PAIR))
    _log(f"labels: {entry['line']}")
    return {"diagnosed_images": result["images"], "probabilities": result["probabilities"],
            "head_accuracy": result["accuracy"], "issues_overall": result["issues"], "seconds": result.get("seconds"),
            **{k: entry[k] for k in ("pair", "names", "images", "issues", "issue_share", "overlap", "overlapping",
                                     "exemplars", "verdict", "line")}}


def _mark_prototype(store, planted) -> int:
    """The prototype most often assigned to the mark's cells in the marked probe images."""
    protos = store.read_tensors("prototypes")
    assignment = protos["assignment"]
    probe_idx, _ = store.probe()
    marked = planted.marked[probe_idx]
    h, w = assignment.shape[1:]
    cell = planted.masks[0]
    cells = torch.nn.functional.adaptive_max_pool2d(cell[None, None].float(), (h, w))[0, 0] > 0
    values = assignment[marked][:, cells].flatten()
    return int(torch.bincount(values).argmax()) if values.numel() else -1


def _ceiling(args, init, train, test) -> dict:
    """How reducible the pair's confusions are: the same model trained 4x longer, and a 2x wider one."""
    from i2x.loop.training import calibration_images

    calib = calibration_images(train)
    out = {}
    wider = {"widths": (32, 64, 128)} if args.model == "small-resnet" else None
    for name, epochs, build in (("4x longer", 4 * args.epochs, {}), ("2x wider", args.epochs, wider)):
        if build is None:
            continue
        torch.manual_seed(0)
        model = train_plain(args, args.out / f"ceiling-{name.replace(' ', '-')}.safetensors",
                            init if not build else None, train, epochs, **build)
        ev = i2x.evaluate(model, test, calib.to(args.device), num_classes=train.num_classes)
        out[name] = {"epochs": epochs, "build": {k: list(v) for k, v in build.items()}, "accuracy": ev["accuracy"],
                     "pair_confusions": ev["confusion"][PAIR[0]][PAIR[1]] + ev["confusion"][PAIR[1]][PAIR[0]]}
        _log(f"ceiling {name}: accuracy {100 * ev['accuracy']:.2f}%, pair confusions {out[name]['pair_confusions']}")
    return out


def publish(prefix: Path, results: dict, extra: dict, args: dict) -> None:
    from i2x.loop.experiments import results_markdown

    prefix.parent.mkdir(parents=True, exist_ok=True)
    data = {"pair": results["pair"], "pair_names": results["pair_names"], "config": results["config"],
            "start": results["start"], "arms": results["arms"], "summary": results["summary"],
            "targets": results["targets"], "extra": extra,
            "command": {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()}}
    prefix.with_suffix(".json").write_text(json.dumps(data, indent=1))
    prefix.with_suffix(".md").write_text(results_markdown(results))


if __name__ == "__main__":
    main()
