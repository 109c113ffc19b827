"""Shortcut repair on Decoy-FashionMNIST: i2x's model-wide loop against RRR, JTT and DFR.

    python -P scripts/decoy_experiment.py OUT [--seeds 5] [--train-size N] [--ft-size N] [--epochs 4]
                                              [--ft-epochs 1] [--arms vanilla,clean,...]
                                              [--publish docs/results/decoy-fashion-mnist]
    torchrun --standalone --nproc-per-node 2 scripts/decoy_experiment.py OUT ...   (the cells in 2 processes)
    python -P scripts/decoy_experiment.py OUT --coverage   (after a run: which prototype holds each class's square)

``--val-size`` training images (default 5,000, stratified) are held out from every model. One
decoyed model (small-resnet, ``--epochs`` of i2x's recipe on the rest of decoy-fashion-mnist,
tracked, its prototypes and analysis) and one clean model (the same recipe on the same images
without decoys) are trained once. Every arm then fine-tunes a copy of the decoyed model (the clean
arm: of the clean model) on the same ``--ft-size`` training images for ``--ft-epochs`` epochs
with the same optimiser, learning rate, batch and data order per seed:

    vanilla      the decoyed training set as it is (the control)
    clean        the clean model on clean data (the reference the gap is measured to)
    rrr_masks    + RRR on the ground-truth decoy masks (the human-mask upper bound)
    rrr_i2x      + RRR on i2x's flagged regions (model-scope targets; no human masks)
    jtt          JTT: the decoyed model's training errors upweighted (lambda_up 20)
    dfr_i2x      vanilla, then DFR-style last-layer refit on a set balanced by i2x's groups
                 (class x "a flagged shortcut prototype is in the image"); DFR proper uses group labels
    random       control: as many random samples of each class dropped as i2x's targets hold
    hard         control: the lowest-margin samples drawn once more
    transplanted i2x: each target's flagged region pasted into an image of another class
    transplanted_tuned  the same, with the shortcut reading's cut and the targets' cap chosen from
                 ``--i2x-rules`` on the held-out images, as RRR's weight is (same budget)

i2x's arms never see the masks and run with the library's defaults (the analysis' shortcut cut,
the model-scope target rule). RRR's weight is chosen once from ``--rrr-weights`` on the held-out
images with the test rule (random greys), which needs the masks: the mask baseline gets its best
weight, and ``rrr_i2x`` uses the same one (stated on the page).

Under ``torchrun`` rank 0 trains the models first (the other processes wait), then every process
takes every n-th cell. Each cell is written to ``OUT/cells/ARM-SEED.json`` when it finishes; a
second run skips finished cells. Measured per cell: accuracy on the decoyed and the clean test
sets, and the wrong-reason share (GradCAM relevance inside the decoy mask, averaged over
``--wrong-reason-images`` decoyed test images). ``OUT/results.json`` and ``results.md`` hold the
table: means, paired differences against ``vanilla`` with 95% t-intervals over seeds, the share of
the vanilla-to-clean gap each arm recovers on the decoyed test set, and the wall time.

``--coverage`` (after a run, trains nothing) reads the decoyed run's prototype assignment of its
probe images and, with the masks, says per class which prototype holds most of its squares and
how pure that prototype is: an upper bound on what any cut of the prototype reading can flag.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

import i2x
from i2x._internal.ranks import agree, process_group, share
from i2x.apps.demo import train_run
from i2x.data import ImageDataset, load_dataset, stratified_subset, training_subset
from i2x.loop import RRRPenalty, dfr_retrain, find_targets, jtt_error_set, jtt_sampler
from i2x.loop.experiments import paired_interval
from i2x.loop.targets import NothingToCurate, load_targets
from i2x.loop.training import calibration_images, evaluate, finetune
from i2x.store import RunStore
from i2x.track import final_model

ARMS = ("vanilla", "clean", "rrr_masks", "rrr_i2x", "jtt", "dfr_i2x", "random", "hard", "transplanted",
        "transplanted_tuned")
I2X_ARMS = ("rrr_i2x", "dfr_i2x", "transplanted", "transplanted_tuned")
#: The i2x rules ``transplanted_tuned`` chooses from on the held-out images, as RRR's weight is
#: chosen (the same budget: four settings, one fine-tuning run each): the shortcut reading's cut
#: ("otsu", or a fraction of the top score) and the targets' per-class cap (max_fraction).
I2X_RULES = ("otsu:0.5", "otsu:1.0", "0.25:0.5", "0.25:1.0")


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _held_out(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rest, validation)`` positions of the 60,000 training images: a stratified, seeded
    validation split that no model trains on (the same for the decoyed and the clean set)."""
    labels = load_dataset("fashion-mnist", train=True).labels
    val = stratified_subset(labels, size, seed=2) if size else torch.zeros(0, dtype=torch.int64)
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten(), val


def oracle_validation(val, seed: int = 0):
    """The validation images with the test rule: each square takes the grey of a random class,
    so the decoy carries no information (what the decoyed test set does). It needs the masks: only
    the mask-based baseline is tuned on it."""
    from i2x.data.decoy import decoy_grey

    g = torch.Generator().manual_seed(seed)
    drawn = torch.randint(0, val.num_classes, (len(val),), generator=g)
    pixels = val.denormalize(val.images)
    square = val.masks.expand_as(pixels)
    pixels = torch.where(square, decoy_grey(drawn).view(-1, 1, 1, 1).expand_as(pixels), pixels)
    mean = torch.tensor(val.mean).view(1, -1, 1, 1)
    std = torch.tensor(val.std).view(1, -1, 1, 1)
    return ImageDataset((pixels - mean) / std, val.labels, list(val.classes), val.name, "train", val.mean,
                        val.std, masks=val.masks, decoy_labels=drawn, decoy_seed=val.decoy_seed)


def _data(args) -> dict:
    full = load_dataset("decoy-fashion-mnist", train=True)
    clean_full = load_dataset("fashion-mnist", train=True)
    rest, val = _held_out(len(full), args.val_size)
    train, record = training_subset(full.subset(rest), args.train_size, seed=0)
    record.update(name="decoy-fashion-mnist", decoy_seed=0, held_out={"size": args.val_size, "seed": 2})
    clean_train, clean_record = training_subset(clean_full.subset(rest), args.train_size, seed=0)
    clean_record.update(name="fashion-mnist", held_out={"size": args.val_size, "seed": 2})
    # The arms fine-tune on a stratified part of the training set (the same part for every arm)
    ft_train, _ = training_subset(train, args.ft_size, seed=1)
    ft_clean, _ = training_subset(clean_train, args.ft_size, seed=1)
    return {"train": train, "record": record, "clean_train": clean_train, "clean_record": clean_record,
            "ft_train": ft_train, "ft_clean": ft_clean, "validation": oracle_validation(full.subset(val)),
            "test": load_dataset("decoy-fashion-mnist", train=False),
            "clean_test": load_dataset("fashion-mnist", train=False)}


def _optimiser(args) -> dict:
    """The fine-tuning optimiser every arm shares: finetune's SGD (momentum 0.9, weight decay
    5e-4) at ``--lr``, or Adam at ``--lr`` (the optimiser of the RRR paper)."""
    if args.optimizer == "adam":
        lr = 1e-3 if args.lr is None else args.lr
        return {"optimizer": lambda params: torch.optim.Adam(params, lr=lr)}
    return {"lr": args.lr}


def choose_on_validation(path: Path, key: str, options, fit, d: dict) -> dict:
    """One fine-tuning per option (``fit(option) -> (model, figures)``, model None when the option
    failed, with the reason in figures), each scored by its accuracy on the oracle validation
    split; the best is ``chosen``. Written to ``path`` once; a second call reads it back."""
    if path.exists():
        return json.loads(path.read_text())
    calibration = calibration_images(d["ft_train"])
    trials = []
    for option in options:
        model, figures = fit(option)
        acc = 0.0 if model is None else evaluate(model, d["validation"], calibration, num_classes=10)["accuracy"]
        trials.append({key: option, "validation_accuracy": acc, **figures})
        print(f"{path.stem}: {key} {option}: " + (f"validation accuracy {100 * acc:.1f}%" if model is not None
                                                   else f"failed ({figures})"), flush=True)
    best = max(trials, key=lambda t: t["validation_accuracy"])
    result = {"chosen": best[key], "trials": trials, "validation_size": len(d["validation"])}
    _write_json(path, result)
    return result


def tune_rrr(out: Path, args, d: dict, decoyed) -> dict:
    """RRR's weight (lambda), chosen once from ``--rrr-weights`` by the accuracy on the oracle
    validation split after one fine-tuning run (seed 0) with the true masks; both RRR arms use it.
    The paper sets lambda so that its two loss terms are of a size; how large that is depends on
    the input scale and the model, so the grid spans three orders of magnitude."""
    def fit(weight):
        model = copy.deepcopy(decoyed)
        try:
            stats = finetune(model, d["ft_train"], penalty=RRRPenalty(d["ft_train"].masks, weight=weight),
                             epochs=args.ft_epochs, seed=0, batch_size=args.batch_size, **_optimiser(args))
        except FloatingPointError as e:  # too large a weight for this learning rate: the loss diverged
            return None, {"diverged": str(e)}
        return model, {"mean_loss": stats.mean_loss, "mean_penalty": stats.mean_penalty}

    return choose_on_validation(out / "rrr_tuning.json", "weight", args.rrr_weights, fit, d)


def _rule(text: str) -> tuple[str | float, float]:
    cut, cap = text.split(":")
    return (cut if cut == "otsu" else float(cut)), float(cap)


def rule_targets(out: Path, rule: str, decoyed, d: dict):
    """The model-scope targets of the decoyed run under ``rule`` ("CUT:CAP"), found in a copy of
    the run (``OUT/rules/RULE``) so the run's own analysis and targets stay the defaults'."""
    import shutil

    folder = out / "rules" / rule.replace(":", "_")
    done = folder.with_suffix(".done")  # beside the run: the run folder holds only its own files
    if not done.exists():
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(out / "decoyed", folder, ignore=shutil.ignore_patterns(".i2x-lock"))
        cut, cap = _rule(rule)
        i2x.analyze(folder, shortcut_threshold=cut)  # replaces the copy's analysis and targets below
        try:
            find_targets(folder, decoyed, d["ft_train"], scope="model", probe_dataset=d["train"], max_fraction=cap)
        except NothingToCurate as e:
            print(f"rule {rule}: {e}", flush=True)
        done.write_text(rule)
    return load_targets(folder)


def tune_i2x(out: Path, args, d: dict, decoyed) -> dict:
    """The rule of ``transplanted_tuned``, chosen once from ``--i2x-rules`` by the accuracy on the
    oracle validation split after one transplant fine-tuning (seed 0): the same budget RRR's weight
    gets. Only the validation images' test-rule greys are used, never their masks."""
    def fit(rule):
        try:
            targets = rule_targets(out, rule, decoyed, d)
        except NothingToCurate as e:
            return None, {"nothing_flagged": str(e)}
        model = copy.deepcopy(decoyed)
        finetune(model, targets.transplanted(d["ft_train"], seed=0), epochs=args.ft_epochs, seed=0,
                 batch_size=args.batch_size, **_optimiser(args))
        return model, {"targets": int(targets.selected.sum()),
                       "prototypes": sorted({int(p["prototype"]) for p in targets.summary()["prototypes"]})}

    return choose_on_validation(out / "i2x_tuning.json", "rule", args.i2x_rules, fit, d)


def train_models(out: Path, args) -> None:
    """Rank 0, before the processes meet: the decoyed and the clean model (trained once, resumable),
    the decoyed run's analysis, its model-scope targets over the fine-tuning set, RRR's weight."""
    d = _data(args)
    _, decoyed, _ = train_run(out / "decoyed", d["train"], epochs=args.epochs, probe_size=args.probe_size,
                              n_prototypes=args.n_prototypes, dataset_record=d["record"])
    train_run(out / "clean", d["clean_train"], epochs=args.epochs, probe_size=args.probe_size,
              n_prototypes=args.n_prototypes, dataset_record=d["clean_record"])
    store = RunStore.open(out / "decoyed")
    if not store.has("analysis"):
        i2x.analyze(store.path)
    try:
        load_targets(store.path)
    except FileNotFoundError:
        try:
            find_targets(store.path, decoyed, d["ft_train"], scope="model", probe_dataset=d["train"], progress=True)
        except NothingToCurate as e:  # the run's targets.json now says so; the i2x arms are skipped
            print(f"targets: {e}", flush=True)
    except NothingToCurate:
        pass
    tune_rrr(out, args, d, decoyed)
    if "transplanted_tuned" in args.arm_list:
        tune_i2x(out, args, d, decoyed)


def prepare(out: Path, args) -> dict:
    """Every rank: the data, both trained models and the targets, read from the runs."""
    ctx = _data(args)
    ctx["decoyed"] = final_model(RunStore.open(out / "decoyed"))
    ctx["clean"] = final_model(RunStore.open(out / "clean"))
    try:
        ctx["targets"], ctx["no_targets"] = load_targets(out / "decoyed"), None
    except NothingToCurate as e:  # the analysis flagged nothing: the arms that need targets are skipped
        ctx["targets"], ctx["no_targets"] = None, str(e)
    ctx["rrr_weight"] = json.loads((out / "rrr_tuning.json").read_text())["chosen"]
    ctx["tuned_targets"] = None
    if "transplanted_tuned" in args.arm_list:
        rule = json.loads((out / "i2x_tuning.json").read_text())["chosen"]
        try:
            ctx["tuned_targets"] = rule_targets(out, rule, ctx["decoyed"], ctx)
        except NothingToCurate as e:  # the arm is then skipped, with the reason
            ctx["no_tuned_targets"] = str(e)
    return ctx


def _measure(model, ctx: dict, calibration, n_wrong: int) -> dict:
    test, clean_test = ctx["test"], ctx["clean_test"]
    acc = evaluate(model, test, calibration, num_classes=test.num_classes)["accuracy"]
    clean_acc = evaluate(model, clean_test, calibration, num_classes=test.num_classes)["accuracy"]
    from i2x.track.batchnorm import recalibrated_batchnorm

    with recalibrated_batchnorm(model, calibration, torch.device("cpu")):
        share = i2x.wrong_reason_share(model.eval(), test.images[:n_wrong], test.masks[:n_wrong])
    return {"decoyed_accuracy": acc, "clean_accuracy": clean_acc, "wrong_reason": float(share.value)}


NEEDS_TARGETS = ("rrr_i2x", "dfr_i2x", "random", "hard", "transplanted")


def run_cell(arm: str, seed: int, ctx: dict, args) -> dict:
    train, targets = ctx["ft_train"], ctx["targets"]
    if targets is None and arm in NEEDS_TARGETS:
        return {"arm": arm, "seed": seed, "skipped": f"no targets: {ctx['no_targets']}"}
    if arm == "transplanted_tuned" and ctx["tuned_targets"] is None:
        return {"arm": arm, "seed": seed, "skipped": f"no targets under the tuned rule: {ctx['no_tuned_targets']}"}
    recipe = {"epochs": args.ft_epochs, "seed": seed, "batch_size": args.batch_size, **_optimiser(args)}
    start = ctx["clean"] if arm == "clean" else ctx["decoyed"]
    model = copy.deepcopy(start)
    began = time.perf_counter()
    if arm == "clean":
        finetune(model, ctx["ft_clean"], **recipe)
    elif arm in ("vanilla", "dfr_i2x"):
        finetune(model, train, **recipe)
        if arm == "dfr_i2x":
            flagged = torch.zeros(len(train), dtype=torch.int64)
            flagged[targets.target_indices] = 1
            dfr_retrain(model, train, train.labels * 2 + flagged, seed=seed,
                        calibration=calibration_images(train))
    elif arm == "rrr_masks":
        finetune(model, train, penalty=RRRPenalty(train.masks, weight=ctx["rrr_weight"]), **recipe)
    elif arm == "rrr_i2x":
        finetune(model, train, penalty=RRRPenalty.from_targets(targets, train, weight=ctx["rrr_weight"]), **recipe)
    elif arm == "jtt":
        errors = jtt_error_set(ctx["decoyed"], train, calibration=calibration_images(train))
        finetune(model, train, sampler=jtt_sampler(train, errors, seed=seed), **recipe)
    elif arm == "random":
        finetune(model, targets.random_subset(train, seed=seed), **recipe)
    elif arm == "hard":
        finetune(model, train, sampler=targets.hard_sampler(train, seed=seed), **recipe)
    elif arm == "transplanted":
        finetune(model, targets.transplanted(train, seed=seed), **recipe)
    elif arm == "transplanted_tuned":
        finetune(model, ctx["tuned_targets"].transplanted(train, seed=seed), **recipe)
    else:
        raise ValueError(f"--arms: unknown arm {arm!r}; known: {', '.join(ARMS)}")
    trained_s = time.perf_counter() - began
    calibration = calibration_images(ctx["ft_clean"] if arm == "clean" else train)
    return {"arm": arm, "seed": seed, "train_s": round(trained_s, 1), **_measure(model, ctx, calibration,
                                                                                  args.wrong_reason_images)}


def summarize(cells: list[dict], arms: list[str], seeds: list[int]) -> dict:
    by = {(c["arm"], c["seed"]): c for c in cells if "skipped" not in c}
    table = {}
    for arm in arms:
        mine = [by[(arm, s)] for s in seeds if (arm, s) in by]
        if not mine:
            continue
        entry = {"seeds": [c["seed"] for c in mine]}
        for key in ("decoyed_accuracy", "clean_accuracy", "wrong_reason"):
            entry[key] = sum(c[key] for c in mine) / len(mine)
            paired = [by[(arm, c["seed"])][key] - by[("vanilla", c["seed"])][key]
                      for c in mine if ("vanilla", c["seed"]) in by]
            if paired and arm != "vanilla":
                entry[f"{key}_vs_vanilla"] = paired_interval(paired)
        gaps = [(by[(arm, s)]["decoyed_accuracy"] - by[("vanilla", s)]["decoyed_accuracy"])
                / (by[("clean", s)]["decoyed_accuracy"] - by[("vanilla", s)]["decoyed_accuracy"])
                for s in entry["seeds"] if ("vanilla", s) in by and ("clean", s) in by
                and by[("clean", s)]["decoyed_accuracy"] != by[("vanilla", s)]["decoyed_accuracy"]]
        if gaps and arm not in ("vanilla", "clean"):
            entry["gap_recovered"] = paired_interval(gaps)
        table[arm] = entry
    return table


def _ci(d: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not d:
        return "-"
    if d["lo"] is None:
        return f"{scale * d['mean']:+.{digits}f} (one seed: no interval)"
    return f"{scale * d['mean']:+.{digits}f} [{scale * d['lo']:+.{digits}f}, {scale * d['hi']:+.{digits}f}]"


def markdown(table: dict, config: dict) -> str:
    lines = [f"Config: {json.dumps(config)}", "",
             "| arm | seeds | decoyed test acc % | vs vanilla (pts) | gap recovered % | clean test acc % | "
             "wrong-reason share | vs vanilla |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, e in table.items():
        lines.append(f"| {arm} | {len(e['seeds'])} | {100 * e['decoyed_accuracy']:.1f} | "
                     f"{_ci(e.get('decoyed_accuracy_vs_vanilla'), 100)} | {_ci(e.get('gap_recovered'), 100, 0)} | "
                     f"{100 * e['clean_accuracy']:.1f} | {e['wrong_reason']:.3f} | "
                     f"{_ci(e.get('wrong_reason_vs_vanilla'), 1, 3)} |")
    return "\n".join(lines) + "\n"


def prototype_coverage(out: Path, args) -> list[dict]:
    """Per class: the prototype on most of its probe images' squares, the share of the class's
    squares it holds, and the share of its cells (over all probe images and positions) that are
    this class's squares. Uses the masks: an analysis after the fact, never an input of an arm."""
    store = RunStore.open(out / "decoyed")
    (indices, labels), assignment = store.probe(), store.read_tensors("prototypes", ["assignment"])["assignment"]
    train = _data(args)["train"]
    masks = train.masks[indices].float()
    masks = masks.reshape(masks.shape[0], 1, *masks.shape[-2:])  # [N, 1, H, W]
    h, w = assignment.shape[1:]
    # The share of each grid cell the square covers; the square lies in one cell when the image's
    # side is a multiple of the grid's (28 px, 7x7: 4 px cells, the square's own size).
    cover = torch.nn.functional.adaptive_avg_pool2d(masks, (h, w)).squeeze(1)
    square_cell = cover > 0.5
    if not square_cell.flatten(1).sum(1).eq(1).all():
        raise ValueError(f"the {h}x{w} grid does not put each square in one cell; coverage needs it")
    on_square = assignment[square_cell]  # the prototype on each image's square cell, [N]
    k = int(assignment.max()) + 1
    rows = []
    for c, name in enumerate(store.classes):
        mine = on_square[labels == c]
        if not mine.numel():
            continue
        top = int(torch.bincount(mine, minlength=k).argmax())
        cells = assignment == top
        own = cells & square_cell & (labels == c).view(-1, 1, 1)
        rows.append({"class": c, "name": name, "prototype": top,
                     "share_of_squares": float((mine == top).float().mean()),
                     "purity": float(own.sum() / cells.sum())})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--train-size", type=int, default=None, help="a stratified subset of the 60,000 images")
    p.add_argument("--ft-size", type=int, default=None,
                   help="the arms fine-tune on a stratified subset of this many training images (default all)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the decoyed and the clean model")
    p.add_argument("--ft-epochs", type=int, default=1, help="fine-tuning epochs of every arm")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default finetune's, 0.005)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="the fine-tuning optimiser of every arm (adam: default lr 1e-3, the RRR paper's)")
    p.add_argument("--probe-size", type=int, default=2000)
    p.add_argument("--n-prototypes", type=int, default=32)
    p.add_argument("--rrr-weights", type=lambda t: [float(v) for v in t.split(",")], default=[10.0, 100.0, 1000.0],
                   help="RRR's lambda grid, chosen on the oracle validation split (default 10,100,1000)")
    p.add_argument("--i2x-rules", type=lambda t: [r.strip() for r in t.split(",") if r.strip()],
                   default=list(I2X_RULES), help="transplanted_tuned's grid of CUT:CAP rules (the shortcut reading's "
                                                 "cut, otsu or a fraction of the top score; the targets' max_fraction)")
    p.add_argument("--val-size", type=int, default=5000,
                   help="training images held out from every model, for tuning RRR (default 5000)")
    p.add_argument("--wrong-reason-images", type=int, default=1000)
    p.add_argument("--publish", type=Path, default=None, help="also write PATH.json and PATH.md")
    p.add_argument("--coverage", action="store_true",
                   help="after a run: per class, the prototype holding its squares (uses the masks; trains nothing)")
    args = p.parse_args(argv)
    if args.coverage:
        print("| class | prototype on most of its squares | share of the class's squares | share of that "
              "prototype's cells that are this class's squares |\n|---|---|---|---|")
        for r in prototype_coverage(args.out, args):
            print(f"| {r['name']} | {r['prototype']} | {100 * r['share_of_squares']:.1f}% | {100 * r['purity']:.0f}% |")
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        p.error(f"--arms: unknown {bad}; known: {', '.join(ARMS)}")
    args.arm_list = arms
    for rule in args.i2x_rules:
        try:
            cut, cap = _rule(rule)
            if not (cut == "otsu" or 0 < cut <= 1) or not 0 < cap <= 1:
                raise ValueError
        except ValueError:
            p.error(f"--i2x-rules: {rule!r} is not CUT:CAP (CUT: otsu or a fraction in (0, 1]; CAP in (0, 1])")
    began = time.perf_counter()
    cells_dir = args.out / "cells"
    if int(os.environ.get("RANK", "0")) == 0:  # before the processes meet: a Tracker must see no group
        args.out.mkdir(parents=True, exist_ok=True)
        cells_dir.mkdir(exist_ok=True)
        # torchrun gives each process one thread; while rank 0 trains, the others only wait
        threads = torch.get_num_threads()
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        try:
            train_models(args.out, args)
        finally:
            torch.set_num_threads(threads)
    # The other ranks wait here while rank 0 trains (hours at full size)
    rank, world = process_group(timeout=timedelta(hours=24))
    ctx = prepare(args.out, args)
    seeds = list(range(args.seeds))
    everything = [(arm, seed) for seed in seeds for arm in arms]
    error = None
    try:
        for arm, seed in share(everything, rank, world):  # cells, not seeds: no arm shares a prefix here
            path = cells_dir / f"{arm}-{seed}.json"
            if path.exists():
                continue
            cell = run_cell(arm, seed, ctx, args)
            _write_json(path, cell)
            if "skipped" in cell:
                print(f"[rank {rank}] {arm} seed {seed}: skipped ({cell['skipped']})", flush=True)
                continue
            print(f"[rank {rank}] {arm} seed {seed}: decoyed {100 * cell['decoyed_accuracy']:.1f}%, clean "
                  f"{100 * cell['clean_accuracy']:.1f}%, wrong-reason {cell['wrong_reason']:.3f} "
                  f"({cell['train_s']:.0f} s)", flush=True)
    except Exception as e:
        error = e
    agree(error, world, "decoy_experiment")
    if rank != 0:
        return 0
    cells = [json.loads((cells_dir / f"{arm}-{seed}.json").read_text()) for arm, seed in everything]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["targets"] = ctx["targets"].summary() if ctx["targets"] is not None else {"none": ctx["no_targets"]}
    config["processes"] = world
    config["rrr_tuning"] = json.loads((args.out / "rrr_tuning.json").read_text())
    if ctx["tuned_targets"] is not None:
        config["i2x_tuning"] = json.loads((args.out / "i2x_tuning.json").read_text())
        config["tuned_targets"] = ctx["tuned_targets"].summary()
    config.pop("arm_list", None)
    table = summarize(cells, arms, seeds)
    results = {"config": config, "cells": cells, "table": table, "wall_s": round(time.perf_counter() - began, 1)}
    _write_json(args.out / "results.json", results)
    text = markdown(table, {k: config[k] for k in ("seeds", "train_size", "ft_size", "epochs", "ft_epochs", "lr",
                                                   "optimizer", "val_size")} | {"rrr_weight": ctx["rrr_weight"]})
    (args.out / "results.md").write_text(text)
    if args.publish:
        _write_json(args.publish.with_suffix(".json"), results)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
