"""Shortcuts no one here drew: the whole loop, run as a user runs it, on marks drawn from a seed.

    python -P scripts/unseen_shortcuts.py OUT [--mark-seed 2026] [--marks 12] [--only 0,3]
                                              [--seeds 3] [--train-size 12000] [--epochs 4]
                                              [--scope pair] [--publish docs/results/unseen-shortcuts]

``i2x.loop.planted.draw_marks(--marks, --mark-seed)`` draws the marks: every kind of shape in turn
(square, bar, ring, dots, texture, tint), sizes 3-6 px, one place or four per-image places, an
intensity, and a pair (one class 60-95%, the other 0-10%) or one class against the rest. The
published page uses ``PUBLISHED_SEED``; the loop's defaults are chosen on marks of other seeds.

Per mark, on Fashion-MNIST (``--train-size`` training images, the demo's recipe):

1. The mark is planted into the training images by its rates, into 2,000 held-out training images
   by the same rates (the validation split), and into half of the test images of every class it
   names (``Mark.for_test``), so at test it carries no information.
2. The whole loop with the library's defaults and no hint: ``train_run`` (online Tracker,
   prototypes), ``i2x.analyze`` (no pair, class or prototype given), ``find_targets`` (the
   default rule, ``--scope``), the counterfactual copies of the held-out images
   (``i2x.apps.demo.counterfactual_split``), ``i2x.experiment`` over the demo's arms with the
   held-out images, and the arm the experiment recommends (or none: the model is kept).
3. A clean model (the same recipe on the unmarked images, trained once for all marks) gives the
   ``clean`` arm: the reference the gap is measured to.

Measured per mark, with the planted truth the loop never saw:
- found: the prototypes the model-wide reading and the pair analysis flagged, and for each the
  share of its probe cells that lie on the mark; the mark counts as found when a flagged prototype
  lies mostly (> 50%) on it. The prototype most on the mark is reported too (could any cut see it?).
- the targets' precision and recall against the marked training images;
- test errors (all classes, the marked test set) of every arm, and the share of the gap between
  ``full->full`` and ``clean`` the recommended arm recovers (per seed, 95% t-interval); where
  nothing is recommended, what keeping the model gives.

Every stage is resumable (runs, experiments and ``OUT/marks/NN.json`` are reused). ``OUT/suite.json``
(and with ``--publish`` ``PATH.json``) holds every figure; ``OUT/suite.md`` the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import i2x
from i2x.apps.demo import DEMO_PLANS, counterfactual_split, held_out, train_run
from i2x.data import load_dataset, training_subset
from i2x.loop import find_targets
from i2x.loop.experiments import paired_interval
from i2x.loop.planted import draw_marks
from i2x.loop.targets import NothingToCurate, load_targets
from i2x.store import RunStore

PUBLISHED_SEED = 2026
VALIDATION_SIZE = 2_000
PLAN = DEMO_PLANS["default"]
ARMS = (*PLAN.arms, "clean")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def errors_of(cell: dict) -> int:
    """Test images of any class predicted wrongly, from a cell's confusion matrix."""
    confusion = torch.tensor(cell["confusion"])
    return int(confusion.sum() - confusion.diagonal().sum())


def prototype_purity(store: RunStore, pixel_masks: torch.Tensor) -> torch.Tensor:
    """``[K]``: the share of each prototype's probe cells that touch the mark (over every probe
    image and grid position)."""
    indices, _ = store.probe()
    assignment = store.read_tensors("prototypes", ["assignment"])["assignment"]
    k = int(assignment.max()) + 1
    on_mark = F.adaptive_max_pool2d(pixel_masks[indices][:, None].float(), tuple(assignment.shape[1:]))[:, 0] > 0
    return torch.tensor([float((on_mark & (assignment == j)).sum()) / max(1, int((assignment == j).sum()))
                         for j in range(k)])


def flagged_prototypes(analysis: dict) -> dict[str, list[int]]:
    """What the analysis flagged, without a hint: the model-wide reading's prototypes, and the top
    pair's flagged and decisive ones."""
    reading = (analysis.get("shortcuts") or {}).get("prototypes_flagged", [])
    top = (analysis.get("uncertainty") or [{}])[0]
    pair = sorted({int(p["prototype"]) for p in top.get("flagged", [])}
                  | {int(p["prototype"]) for p in top.get("decisive", [])})
    return {"reading": [int(p) for p in reading], "pair": pair, "top_pair": top.get("pair")}


def gap_recovered(results: dict, arm: str | None) -> dict | None:
    """``(full->full - arm) / (full->full - clean)`` in test errors, per seed, with its interval;
    ``arm`` None: the model kept as it was (its errors at the start)."""
    arms = results["arms"]
    if "clean" not in arms or "full->full" not in arms:
        return None
    seeds = sorted(set(arms["full->full"]["seeds"]) & set(arms["clean"]["seeds"])
                   & (set(arms[arm]["seeds"]) if arm else set(arms["full->full"]["seeds"])))
    shares = []
    for s in seeds:
        full, clean = errors_of(arms["full->full"]["seeds"][s]), errors_of(arms["clean"]["seeds"][s])
        mine = errors_of(arms[arm]["seeds"][s]) if arm else errors_of(results["start"])
        if full != clean:
            shares.append((full - mine) / (full - clean))
    return paired_interval(shares) if shares else None


def run_mark(i: int, mark, ctx: dict, args) -> dict:
    """The whole loop on one mark, and its figures against the planted truth."""
    path = args.out / "marks" / f"{i:02d}.json"
    if path.exists():
        return json.loads(path.read_text())
    folder = args.out / f"mark-{i:02d}"
    classes = ctx["train"].classes
    _log(f"mark {i}: {mark.describe(classes)}")
    planted = mark.plant(ctx["train"], seed=i)
    validation = mark.plant(ctx["validation"], seed=1_000 + i).dataset
    test = mark.for_test().plant(ctx["test"], seed=2_000 + i).dataset
    store, model, _ = train_run(folder / "run", planted.dataset, epochs=args.epochs, probe_size=PLAN.probe_size,
                                n_prototypes=PLAN.n_prototypes, batch_size=PLAN.batch_size,
                                dataset_record={"name": "fashion-mnist", "mark": mark.to_dict(), "mark_index": i})
    run = store.path
    if not RunStore.open(run).has("analysis"):
        i2x.analyze(run)
    store = RunStore.open(run)  # reopened: the analysis above wrote through a store of its own
    analysis = store.read_json("analysis")
    try:
        try:
            targets = load_targets(run)
        except FileNotFoundError:
            targets = find_targets(run, model, planted.dataset, scope=args.scope)
    except NothingToCurate as e:
        targets, no_targets = None, str(e)
    counterfactual = None
    if targets is not None:
        counterfactual = counterfactual_split(store, model, validation, planted.dataset)
    results = i2x.experiment(run, model, planted.dataset, test, arms=ARMS, seeds=args.seeds, scope=args.scope,
                             validation=validation, counterfactual=counterfactual,
                             clean=(ctx["clean_state"], ctx["train"]), batch_size=PLAN.batch_size,
                             log=lambda line: _log(f"  mark {i}: {line}"))
    purity = prototype_purity(store, planted.pixel_masks())
    flagged = flagged_prototypes(analysis)
    found = {kind: [{"prototype": p, "on_mark": round(float(purity[p]), 3)} for p in ids]
             for kind, ids in flagged.items() if kind != "top_pair"}
    best = int(purity.argmax())
    figures: dict = {
        "index": i, "mark": mark.to_dict(), "described": mark.describe(classes),
        "marked_train_images": int(planted.marked.sum()),
        "top_pair": flagged["top_pair"], "flagged": found,
        "found": any(f["on_mark"] > 0.5 for kind in found.values() for f in kind),
        "most_on_mark": {"prototype": best, "on_mark": round(float(purity[best]), 3)},
    }
    if targets is None:
        figures["targets"] = {"none": no_targets}
    else:
        chosen = torch.zeros(len(planted.dataset), dtype=torch.bool)
        chosen[targets.target_indices] = True
        hits = int((chosen & planted.marked).sum())
        figures["targets"] = {"count": int(chosen.sum()), "true_positives": hits,
                              "precision": hits / max(1, int(chosen.sum())),
                              "recall": hits / max(1, int(planted.marked.sum()))}
    rec = results["recommendation"]
    figures["recommended"] = rec.get("arm")
    figures["recommendation"] = rec.get("reason")
    figures["errors"] = {arm: statistics.fmean(errors_of(c) for c in entry["seeds"].values())
                         for arm, entry in results["arms"].items() if entry["seeds"]}
    figures["errors"]["start"] = errors_of(results["start"])
    figures["gap_recovered"] = {arm: gap_recovered(results, arm) for arm in results["arms"]
                                if arm not in ("clean", "full->full") and results["arms"][arm]["seeds"]}
    figures["outcome"] = {"arm": rec.get("arm") or "kept", "gap_recovered": gap_recovered(results, rec.get("arm"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2))
    return figures


def _pct(c: dict | None) -> str:
    if not c:
        return "-"
    if c.get("lo") is None:
        return f"{100 * c['mean']:+.0f}%"
    return f"{100 * c['mean']:+.0f}% [{100 * c['lo']:+.0f}, {100 * c['hi']:+.0f}]"


def markdown(rows: list[dict], pooled: dict) -> str:
    lines = ["| # | mark | found (prototype: share on the mark) | targets precision / recall | recommended | "
             "gap recovered (outcome) | random->full | hard->full |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flagged = ", ".join(f"{f['prototype']}: {100 * f['on_mark']:.0f}%" for kind in r["flagged"].values()
                            for f in kind) or "nothing flagged"
        t = r["targets"]
        tp = "none" if "none" in t else f"{t['precision']:.2f} / {t['recall']:.2f}"
        g = r["gap_recovered"]
        lines.append(f"| {r['index']} | {r['described']} | {'yes' if r['found'] else 'no'} ({flagged}) | {tp} | "
                     f"{r['outcome']['arm']} | {_pct(r['outcome']['gap_recovered'])} | "
                     f"{_pct(g.get('random->full'))} | {_pct(g.get('hard->full'))} |")
    lines += ["", f"Pooled targets: precision {pooled['precision']:.3f}, recall {pooled['recall']:.3f}; "
                  f"median gap recovered by the outcome {pooled['median_gap']}; marks found {pooled['found']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--mark-seed", type=int, default=PUBLISHED_SEED)
    p.add_argument("--marks", type=int, default=12)
    p.add_argument("--only", default=None, help="comma-separated mark numbers to run (default all)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-size", type=int, default=PLAN.train_size)
    p.add_argument("--epochs", type=int, default=PLAN.epochs)
    p.add_argument("--scope", choices=["pair", "model"], default="pair",
                   help="the loop's scope (the library's default: pair)")
    p.add_argument("--publish", type=Path, default=None, help="also write PATH.json and PATH.md")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    full_train, full_test = load_dataset("fashion-mnist", train=True), load_dataset("fashion-mnist", train=False)
    train, _ = training_subset(full_train, args.train_size, seed=0)
    ctx = {"train": train, "test": full_test, "validation": held_out(full_train, args.train_size, VALIDATION_SIZE)}
    if ctx["validation"] is None:
        p.error("--train-size: leave images out of training for the validation split")
    _, clean, _ = train_run(args.out / "clean", train, epochs=args.epochs, probe_size=PLAN.probe_size,
                            n_prototypes=PLAN.n_prototypes, batch_size=PLAN.batch_size)
    ctx["clean_state"] = {k: v.detach().clone() for k, v in clean.state_dict().items()}
    marks = draw_marks(args.marks, args.mark_seed, tuple(train.image_shape[1:]), train.num_classes)
    chosen = range(len(marks)) if args.only is None else [int(v) for v in args.only.split(",")]
    rows = [run_mark(i, marks[i], ctx, args) for i in chosen]
    with_targets = [r["targets"] for r in rows if "none" not in r["targets"]]
    hits = sum(t["true_positives"] for t in with_targets)
    marked = sum(r["marked_train_images"] for r in rows)
    gaps = [r["outcome"]["gap_recovered"]["mean"] for r in rows if r["outcome"]["gap_recovered"]]
    pooled = {"precision": hits / max(1, sum(t["count"] for t in with_targets)), "recall": hits / max(1, marked),
              "median_gap": f"{100 * statistics.median(gaps):+.0f}%" if gaps else "-",
              "found": f"{sum(r['found'] for r in rows)} of {len(rows)}"}
    suite = {"mark_seed": args.mark_seed, "scope": args.scope, "seeds": args.seeds, "train_size": args.train_size,
             "epochs": args.epochs, "arms": list(ARMS), "marks": rows, "pooled": pooled}
    (args.out / "suite.json").write_text(json.dumps(suite, indent=2))
    text = markdown(rows, pooled)
    (args.out / "suite.md").write_text(text)
    if args.publish:
        args.publish.with_suffix(".json").write_text(json.dumps(suite, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
