"""Would more prototypes, or a finer layer, give a small mark a prototype of its own?

    python -P scripts/unseen_prototypes.py OUT --mark-seed 2026 --marks 12 --only 0,1,8
                                           [--k 16,32,64] [--layer layer2] [--with-square]
    python -P scripts/unseen_prototypes.py OUT --mark-seed 2027 --only 0,3,9 --own-targets
    python -P scripts/unseen_prototypes.py OUT --mark-seed 2027 --only 3,9 --own-experiment
    python -P scripts/unseen_prototypes.py OUT --mark-seed 2027 --only 0,3,9 --own-pick

OUT is a folder of ``scripts/unseen_shortcuts.py`` (its mark runs must be trained). For each mark
the run's final model is loaded, its features at ``--layer`` (default: the run's target layer) are
computed on the run's own probe images (marked as in training), and the prototypes are fitted
again with each ``--k`` (``i2x.track.prototypes.fit_prototypes``, the library's defaults). Against
the planted truth (:meth:`PlantedMark.prototype_shares`) it reports per K:

- the prototype closest to the mark (largest ``holds x marked``): the share of the mark's cells it
  holds, and the share of the images it appears in that carry the mark (the mark's own when both
  are above one half, the suite's "found" test before any flag);
- the prototypes that appear (almost) only in marked images (>= 90% of their images marked) and
  the share of the mark's cells they hold together: what a cut could take without touching
  unmarked images.

With ``--own-targets`` it asks instead where the targets' precision goes on a mark that was
found: the model-wide targets (``find_targets(scope="model")``, nothing saved) from the mark's own
flagged prototype alone (the one the suite's "found" test named: a choice made with the truth,
so a ceiling, not a rule), with the per-class cap (0.5) and without it (1.0), against the suite's
default targets from every flagged prototype, and for every flagged prototype one label-free
candidate for telling the mark's own from the garment parts: how cleanly its targets score (its
share of the true class's CAM) splits the images of the class it was flagged for (Otsu's
separability within that class; a mark on part of a class splits it, a part every image of the
class has does not). Writes ``OUT/own-targets.json``.

With ``--own-pick`` it asks whether the loop could have picked that prototype itself: every
flagged prototype ranked by six statistics it has without the truth (:func:`own_pick`), and the
mark's own prototype's rank by each. Writes ``OUT/own-pick.json``.

With ``--own-experiment`` it asks what the fine-tuning could do with those targets: the suite's
experiment (3 paired seeds, the same recipe, the marked test set, the shared clean model) in a
copy of the mark's run (``OUT/own-experiment/mark-NN/run``), on the targets from the mark's own
prototype without the cap, over the suite's two-stage arms and the two that act in both stages
(``curated->curated``, ``transplanted->transplanted``). Writes ``OUT/own-experiment.json``.

Nothing in the suite's run folders is changed. Prints a table and writes ``OUT/prototypes-refit-LAYER.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import torch

import i2x
from i2x._internal.otsu import otsu_threshold, separability
from i2x.data import held_out_images, load_dataset, training_subset
from i2x.loop import find_targets
from i2x.loop.planted import draw_marks
from i2x.models import build_model
from i2x.store import RunStore
from i2x.track.prototypes import fit_prototypes

PURE = 0.9  # a prototype appears "only in marked images" above this share


def _suite():
    """The suite script's recipe (its plan and the first square), without running it."""
    spec = importlib.util.spec_from_file_location("unseen_shortcuts", Path(__file__).with_name("unseen_shortcuts.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def final_model(store: RunStore, dataset) -> tuple[torch.nn.Module, str]:
    """The run's final model (the suite's recipe) and its target layer's name."""
    net, layer = build_model("small-resnet", dataset.num_classes, in_channels=dataset.image_shape[0])
    net.load_state_dict(store.read_weights())
    return net.eval(), layer


def layer_features(run: Path, dataset, layer: str | None) -> torch.Tensor:
    """``[N, C, h, w]``: the run's final model at ``layer`` on its probe images of ``dataset``."""
    store = RunStore.open(run)
    net, default_layer = final_model(store, dataset)
    modules = dict(net.named_modules())
    name = layer or default_layer
    if name not in modules:
        raise ValueError(f"--layer: the model has no module {name!r} (e.g. {default_layer!r})")
    indices, _ = store.probe()
    images = torch.stack([dataset[int(i)][0] for i in indices])
    out: list[torch.Tensor] = []
    hook = modules[name].register_forward_hook(lambda module, args, output: out.append(output.detach()))
    try:
        with torch.no_grad():
            for batch in images.split(256):
                net(batch)
    finally:
        hook.remove()
    return torch.cat(out)


def refit(features: torch.Tensor, planted, indices: torch.Tensor, k: int) -> dict:
    """Prototypes fitted anew with ``k`` clusters, scored against the planted mark."""
    prototypes = fit_prototypes(lambda: iter(features.split(256)), n_prototypes=k,
                                pca_dim=min(64, features.shape[1]))
    shares = planted.prototype_shares(indices, prototypes.assignment)
    closest = int((shares["holds"] * shares["marked"]).argmax())
    pure = (shares["marked"] >= PURE).nonzero().flatten()
    return {"k": k, "closest": {"prototype": closest, "holds": round(float(shares["holds"][closest]), 3),
                                "marked": round(float(shares["marked"][closest]), 3)},
            "own": bool(shares["own"][closest]),
            "pure_prototypes": pure.tolist(), "pure_hold": round(float(shares["holds"][pure].sum()), 3)}


def own_prototypes(suite, figures: dict) -> list[int]:
    """The flagged prototypes of the model-wide reading that the suite found to be the mark's own."""
    return [f["prototype"] for f in figures["flagged"].get("reading", []) if suite.is_own(f)]


def within_class_separability(store: RunStore, model, planted) -> dict[int, float]:
    """Per flagged prototype of the model-wide reading: how cleanly its target score splits the
    images of the class it was flagged for (Otsu's separability within that class)."""
    flagged_for = {x["prototype"]: x["class"] for x in store.read_json("analysis")["shortcuts"]["ranking"]
                   if x.get("flagged")}
    out = {}
    for k, c in flagged_for.items():  # one scoring pass each: Targets keeps only the max over prototypes
        scores = find_targets(store.path, model, planted.dataset, scope="model", prototypes=[k], save=False,
                              max_fraction=1.0)
        own_class = scores.scores[scores.labels == c].double()
        out[k] = round(separability(own_class, otsu_threshold(own_class)), 3)
    return out


def own_targets(suite, run: Path, planted, figures: dict) -> dict:
    """Precision and recall of the targets from the mark's own flagged prototype(s) alone, with the
    per-class cap and without it (left out where no flagged prototype is the mark's), and each
    flagged prototype's split within the class it was flagged for."""
    own = own_prototypes(suite, figures)
    out: dict = {"own_prototypes": own, "default": {k: figures["targets"].get(k) for k in ("precision", "recall")}}
    store = RunStore.open(run)
    model, _ = final_model(store, planted.dataset)
    out["within_class_separability"] = within_class_separability(store, model, planted)
    if not own:
        return out
    for cap in (0.5, 1.0):
        targets = find_targets(store.path, model, planted.dataset, scope="model", prototypes=own, save=False,
                               max_fraction=cap)
        out[f"cap {cap:g}"] = suite.targets_against(targets.target_indices, planted)
    return out


#: The label-free statistics ``--own-pick`` ranks the flagged prototypes by (see :func:`own_pick`).
PICK_STATISTICS = ("score", "concentration", "presence", "spread", "within_class_separability", "flip_per_area")


def own_pick(suite, run: Path, planted, figures: dict, validation) -> dict:
    """Could a statistic the loop has without the truth tell the mark's own flagged prototype from
    the others? Per flagged prototype of the model-wide reading: its ``score``, ``concentration``
    (its saliency share over its area share) and ``presence`` (share of its class's probe images it
    appears in) from the analysis; ``spread``: the mean distance of its probe cells to their
    centroid over that of every cell (a mark is the same pixels every time: is it tighter?);
    the within-class separability of ``--own-targets``; and ``flip_per_area``: its region pasted
    into held-out images of other classes (the counterfactual copies made from this prototype
    alone), the share of them the model then answers with the donor's class (beyond what it did
    before the paste) per share of the image pasted. Returns each statistic per prototype and the
    own prototype's rank among the flagged ones, largest first and smallest first (1: the
    statistic read that way picks it)."""
    own = own_prototypes(suite, figures)
    store = RunStore.open(run)
    model, _ = final_model(store, planted.dataset)
    flagged = {x["prototype"]: x for x in store.read_json("analysis")["shortcuts"]["ranking"] if x.get("flagged")}
    tensors = store.read_tensors("prototypes", ["assignment", "distances"])
    assignment, distances = tensors["assignment"], tensors["distances"]
    within = within_class_separability(store, model, planted)  # not own_targets: its cap targets are not needed
    stats: dict[int, dict] = {}
    for k, x in flagged.items():
        moved = find_targets(run, model, validation, save=False, probe_dataset=planted.dataset, scope="model",
                             prototypes=[k]).transplanted(validation, seed=0)
        donor_class = validation.labels[moved.donors]
        with torch.no_grad():
            after = model(torch.stack([moved[int(r)][0] for r in moved.recipients])).argmax(1)
            before = model(torch.stack([validation[int(r)][0] for r in moved.recipients])).argmax(1)
        flip = float((after == donor_class).float().mean() - (before == donor_class).float().mean())
        stats[k] = {"score": x["score"], "concentration": x["concentration"], "presence": x["presence"],
                    "spread": float(distances[assignment == k].mean() / distances.mean()),
                    "within_class_separability": within[k],
                    "flip_per_area": flip / float(moved.masks.float().mean())}
    def rank(name: str, sign: float) -> int:
        return sorted(stats, key=lambda k: -sign * stats[k][name]).index(own[0]) + 1

    return {"own_prototypes": own, "flagged": len(stats), "statistics": stats,
            "own_rank": {name: rank(name, 1.0) for name in PICK_STATISTICS} if own else {},
            "own_rank_smallest_first": {name: rank(name, -1.0) for name in PICK_STATISTICS} if own else {}}


OWN_ARMS = ("full->full", "curated->full", "transplanted->full", "curated->curated", "transplanted->transplanted",
            "clean")


def own_experiment(suite, out: Path, i: int, mark, train, planted, figures: dict, test) -> dict:
    """The suite's experiment on the targets of the mark's own flagged prototype (no cap), in a copy
    of the mark's run; the share of the gap each arm recovers and its errors against full->full."""
    own = own_prototypes(suite, figures)
    if not own:
        return {"own_prototypes": own}
    run = out / "own-experiment" / f"mark-{i:02d}" / "run"
    if not run.exists():  # the trained run without the suite's targets and experiment
        shutil.copytree(out / f"mark-{i:02d}" / "run", run,
                        ignore=shutil.ignore_patterns("experiment", "targets.*", ".i2x-lock"))
    store = RunStore.open(run)
    model, _ = final_model(store, planted.dataset)
    clean, _ = final_model(RunStore.open(out / "clean"), train)
    targets = find_targets(run, model, planted.dataset, scope="model", prototypes=own, save=False, max_fraction=1.0)
    results = i2x.experiment(run, model, planted.dataset, mark.for_test().plant(test, seed=2_000 + i).dataset,
                             arms=OWN_ARMS, seeds=3, scope="model", targets=targets,
                             clean=({k: v.detach().clone() for k, v in clean.state_dict().items()}, train),
                             batch_size=suite.PLAN.batch_size)
    return {"own_prototypes": own, "gap": suite.gap_of(results),
            "arms": {arm: {"gap_recovered": suite.gap_recovered(results, arm),
                           "versus_full": suite.versus_full(results, arm)}
                     for arm in OWN_ARMS if arm not in ("clean", "full->full")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--mark-seed", type=int, required=True)
    p.add_argument("--marks", type=int, default=12)
    p.add_argument("--with-square", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated mark numbers (default all)")
    p.add_argument("--k", default="16,32,64", help="comma-separated prototype counts")
    p.add_argument("--layer", default=None, help="the layer to cluster (default: the run's target layer)")
    p.add_argument("--own-targets", action="store_true",
                   help="targets from the mark's own flagged prototype alone, against the default targets")
    p.add_argument("--own-pick", action="store_true",
                   help="rank the flagged prototypes by label-free statistics: is the mark's own first?")
    p.add_argument("--own-experiment", action="store_true",
                   help="the suite's experiment on those targets, with the arms that act in both stages too")
    args = p.parse_args(argv)
    suite = _suite()
    train, _ = training_subset(load_dataset("fashion-mnist", train=True), suite.PLAN.train_size, seed=0)
    marks = draw_marks(args.marks, args.mark_seed, tuple(train.image_shape[1:]), train.num_classes)
    if args.with_square:
        marks.append(suite.FIRST_SQUARE)
    chosen = range(len(marks)) if args.only is None else [int(v) for v in args.only.split(",")]
    test = load_dataset("fashion-mnist", train=False) if args.own_experiment else None
    validation = (held_out_images(load_dataset("fashion-mnist", train=True), suite.PLAN.train_size)
                  if args.own_pick else None)
    rows = []
    for i in chosen:
        run = args.out / f"mark-{i:02d}" / "run"
        if not (run / "weights.safetensors").exists():
            raise SystemExit(f"{run}: no trained run (run scripts/unseen_shortcuts.py on {args.out} first)")
        planted = marks[i].plant(train, seed=i)  # as the suite planted it
        row = {"index": i, "described": marks[i].describe(train.classes)}
        if args.own_experiment or args.own_targets or args.own_pick:
            figures = json.loads((args.out / "marks" / f"{i:02d}.json").read_text())
            if args.own_pick:
                row.update(own_pick(suite, run, planted, figures, marks[i].plant(validation, seed=1_000 + i).dataset))
                cells = " | ".join(f"{row['own_rank'].get(name, '-')}" for name in PICK_STATISTICS)
                cells = f"{row['flagged']} flagged | {cells}"
            elif args.own_experiment:
                row.update(own_experiment(suite, args.out, i, marks[i], train, planted, figures, test))
                cells = " | ".join(f"{arm} {suite._interval(v['gap_recovered'], percent=True)}"
                                   for arm, v in row.get("arms", {}).items())
            else:
                row.update(own_targets(suite, run, planted, figures))
                caps = " | ".join(f"{row[c]['precision']:.2f} / {row[c]['recall']:.2f}" if c in row else "-"
                                  for c in ("cap 0.5", "cap 1"))
                within = ", ".join(f"{k}{'*' if k in row['own_prototypes'] else ''} {v:.2f}" for k, v in
                                   sorted(row["within_class_separability"].items(), key=lambda kv: -kv[1]))
                cells = (f"{row['default']['precision']:.2f} / {row['default']['recall']:.2f} | {caps} | "
                         f"{within}")
            print(f"| {i}: {row['described']} | {row['own_prototypes']} | {cells} |", flush=True)
        else:
            indices, _ = RunStore.open(run).probe()
            features = layer_features(run, planted.dataset, args.layer)
            fits = [refit(features, planted, indices, int(k)) for k in args.k.split(",")]
            row.update(layer=args.layer or "default", grid=list(features.shape[2:]), fits=fits)
            cells = " | ".join(f"{f['closest']['holds']:.2f} / {f['closest']['marked']:.2f}"
                               f"{' (own)' if f['own'] else ''}; {len(f['pure_prototypes'])} pure, "
                               f"{f['pure_hold']:.2f}" for f in fits)
            print(f"| {i}: {row['described']} | {cells} |", flush=True)
        rows.append(row)
    name = ("own-pick" if args.own_pick else "own-experiment" if args.own_experiment
            else "own-targets" if args.own_targets
            else f"prototypes-refit-{args.layer or 'default'}")
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
