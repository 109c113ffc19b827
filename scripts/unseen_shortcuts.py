"""Shortcuts no one here drew: the whole loop, run as a user runs it, on marks drawn from a seed.

    python -P scripts/unseen_shortcuts.py OUT [--mark-seed 2027] [--marks 12] [--only 0,3]
                                              [--seeds 3] [--train-size 12000] [--epochs 4]
                                              [--scope model] [--publish docs/results/unseen-shortcuts]

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
   (``i2x.loop.counterfactual_split``), ``i2x.experiment`` over the demo's arms with the
   held-out images, and the arm the experiment recommends (or none: the model is kept).
3. A clean model (the same recipe on the unmarked images, trained once for all marks) gives the
   ``clean`` arm: the reference the gap is measured to.

Measured per mark, with the planted truth the loop never saw:
- the mark's cost: ``full->full - clean`` test errors per seed (95% t-interval); the model relied
  on the mark measurably when the interval lies above 0 (the median-gap goal counts these marks);
- found: the prototypes the model-wide reading and the pair analysis flagged, and for each the
  share of the mark's probe cells it holds and the share of its probe images that carry the mark
  (:func:`prototype_on_mark`); the mark counts as found when a flagged prototype has both above
  one half. The prototype most on the mark is reported too (could any cut see it?).
- the targets' precision and recall against the marked training images;
- test errors (all classes, the marked test set) of every arm, and the outcome: the recommended
  arm's share of the gap between ``full->full`` and ``clean`` it recovers (per seed, 95%
  t-interval; harmless when the interval lies above -5%) and its errors against ``full->full``.
  Where nothing is recommended the loop changes nothing in the user's plan: 0% recovered, no harm
  (the kept model's own errors are recorded beside it).

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

import i2x
from i2x.apps.demo import DEMO_PLANS, train_run
from i2x.data import held_out_images, load_dataset, training_subset
from i2x.loop import counterfactual_split, find_targets
from i2x.loop.experiments import paired_interval
from i2x.loop.planted import OWN_SHARE, Mark, draw_marks
from i2x.loop.targets import NothingToCurate, load_targets
from i2x.store import RunStore

PUBLISHED_SEED = 2027  # 2026: the first published run (docs/results/unseen-shortcuts-seed2026.json)
PLAN = DEMO_PLANS["default"]
ARMS = (*PLAN.arms, "clean")
#: The mark of the first experiments (docs/results/fashion-mnist-shortcut.md): a bright 4 x 4 square
#: at (1, 1) in 80% of the Shirts and 5% of the T-shirts. ``--with-square`` adds it after the drawn
#: marks, so a rule chosen on dev marks is also checked where the loop is known to help.
FIRST_SQUARE = Mark("square", 4, ((1, 1),), 1.0, ((0, 0.05), (6, 0.8)))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def errors_of(cell: dict) -> int:
    """Test images of any class predicted wrongly, from a cell's confusion matrix."""
    confusion = torch.tensor(cell["confusion"])
    return int(confusion.sum() - confusion.diagonal().sum())


def prototype_on_mark(store: RunStore, planted) -> dict[str, torch.Tensor]:
    """Per prototype of the run, against the planted truth over the probe: ``holds`` and ``marked``
    (:meth:`PlantedMark.prototype_shares`)."""
    indices, _ = store.probe()
    return planted.prototype_shares(indices, store.read_tensors("prototypes", ["assignment"])["assignment"])


def is_own(entry: dict) -> bool:
    """Whether a prototype's figures (``holds``, ``marked``: :meth:`PlantedMark.prototype_shares`)
    make it the mark's own."""
    return entry["holds"] > OWN_SHARE and entry["marked"] > OWN_SHARE


def targets_against(target_indices: torch.Tensor, planted) -> dict:
    """The targets against the marked training images: how many, how many marked, precision, recall."""
    chosen = torch.zeros(len(planted.dataset), dtype=torch.bool)
    chosen[target_indices] = True
    hits = int((chosen & planted.marked).sum())
    return {"count": int(chosen.sum()), "true_positives": hits, "precision": hits / max(1, int(chosen.sum())),
            "recall": hits / max(1, int(planted.marked.sum()))}


def flagged_prototypes(analysis: dict) -> dict[str, list[int]]:
    """What the analysis flagged, without a hint: the model-wide reading's prototypes, and the top
    pair's flagged and decisive ones."""
    reading = (analysis.get("shortcuts") or {}).get("prototypes_flagged", [])
    top = (analysis.get("uncertainty") or [{}])[0]
    pair = sorted({int(p["prototype"]) for p in top.get("flagged", [])}
                  | {int(p["prototype"]) for p in top.get("decisive", [])})
    return {"reading": [int(p) for p in reading], "pair": pair, "top_pair": top.get("pair")}


def _paired_errors(results: dict, arms: tuple[str, ...], split: str | None = None) -> dict[str, dict[str, int]]:
    """Test errors (or with ``split`` the errors on that held-out split) per seed of each of
    ``arms``, on the seeds where every one of them has them."""
    cells = results["arms"]
    seeds = set.intersection(*({s for s, c in cells[a]["seeds"].items() if split is None or split in c}
                               for a in arms))
    return {s: {a: errors_of(cells[a]["seeds"][s]) if split is None else cells[a]["seeds"][s][split]["errors"]
                for a in arms} for s in sorted(seeds)}


def gap_of(results: dict) -> dict | None:
    """How much the mark cost: ``full->full - clean`` test errors per seed, with its interval. The
    model relied on the mark measurably when the interval lies above 0."""
    if "clean" not in results["arms"] or "full->full" not in results["arms"]:
        return None
    per_seed = _paired_errors(results, ("full->full", "clean"))
    return paired_interval([e["full->full"] - e["clean"] for e in per_seed.values()]) if per_seed else None


def gap_recovered(results: dict, arm: str) -> dict | None:
    """``(full->full - arm) / (full->full - clean)`` in test errors, per seed, with its interval."""
    if "clean" not in results["arms"] or "full->full" not in results["arms"]:
        return None
    shares = [(e["full->full"] - e[arm]) / (e["full->full"] - e["clean"])
              for e in _paired_errors(results, ("full->full", "clean", arm)).values()
              if e["full->full"] != e["clean"]]
    return paired_interval(shares) if shares else None


def versus_full(results: dict, arm: str, split: str | None = None) -> dict | None:
    """``arm - full->full`` test errors per seed (below 0: the arm did better), with its interval;
    with ``split`` (``validation``, ``counterfactual``) the errors on that held-out split instead:
    what the loop saw when it decided."""
    per_seed = _paired_errors(results, ("full->full", arm), split)
    return paired_interval([e[arm] - e["full->full"] for e in per_seed.values()]) if per_seed else None


def outcome_of(results: dict, arm: str | None) -> dict:
    """What a user who follows the loop ends with. An arm: its errors against ``full->full`` (worse
    when that interval lies above 0) and, where the mark cost errors (``full->full`` above ``clean``
    on average), its share of the gap recovered, harmless when that interval lies above -5%. Where
    the mark cost nothing the share divides by a gap of about 0 or below (its sign would flip), so
    it is left out and ``harmless`` is the errors' test: not worse. No arm: the loop says to keep
    the model, so it changes nothing in the user's plan (keep it, or train on as they would have:
    ``full->full``): 0% recovered, no harm by construction; the kept model's own test errors are
    recorded beside it (it has the arms' fine-tuning epochs fewer, so it is not compared)."""
    if arm is None:
        return {"arm": "kept", "gap_recovered": {"mean": 0.0, "lo": None, "hi": None, "n": 0}, "harmless": True,
                "worse": False, "start_errors": errors_of(results["start"])}
    versus = versus_full(results, arm)
    worse = bool(versus and versus["lo"] is not None and versus["lo"] > 0)
    gap = gap_of(results)
    if gap is None or gap["mean"] <= 0:
        return {"arm": arm, "gap_recovered": None, "versus_full": versus, "harmless": not worse, "worse": worse}
    recovered = gap_recovered(results, arm)
    return {"arm": arm, "gap_recovered": recovered, "versus_full": versus, "worse": worse,
            "harmless": bool(recovered and recovered["lo"] is not None and recovered["lo"] > -0.05)}


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
        counterfactual = counterfactual_split(store, model, validation, planted.dataset, scope=args.scope)
    results = i2x.experiment(run, model, planted.dataset, test, arms=args.arms, seeds=args.seeds, scope=args.scope,
                             validation=validation, counterfactual=counterfactual,
                             clean=(ctx["clean_state"], ctx["train"]), batch_size=PLAN.batch_size,
                             log=lambda line: _log(f"  mark {i}: {line}"))
    on = prototype_on_mark(store, planted)
    flagged = flagged_prototypes(analysis)

    def entry(p: int) -> dict:
        return {"prototype": p, "holds": round(float(on["holds"][p]), 3), "marked": round(float(on["marked"][p]), 3)}

    found = {kind: [entry(p) for p in ids] for kind, ids in flagged.items() if kind != "top_pair"}
    best = int((on["holds"] * on["marked"]).argmax())
    figures: dict = {
        "index": i, "mark": mark.to_dict(), "described": mark.describe(classes),
        "marked_train_images": int(planted.marked.sum()),
        "top_pair": flagged["top_pair"], "flagged": found,
        "found": any(is_own(f) for kind in found.values() for f in kind),
        "most_on_mark": entry(best),
    }
    if targets is None:
        figures["targets"] = {"none": no_targets}
    else:
        figures["targets"] = targets_against(targets.target_indices, planted)
    rec = results["recommendation"]
    figures["recommended"] = rec.get("arm")
    figures["recommendation"] = rec.get("reason")
    figures["errors"] = {arm: statistics.fmean(errors_of(c) for c in entry["seeds"].values())
                         for arm, entry in results["arms"].items() if entry["seeds"]}
    figures["errors"]["start"] = errors_of(results["start"])
    figures["gap_recovered"] = {arm: gap_recovered(results, arm) for arm in results["arms"]
                                if arm not in ("clean", "full->full") and results["arms"][arm]["seeds"]}
    # each arm against full->full where the loop decided (the plain held-out images, their copies)
    # and on test: how far the held-out evidence tracks what the user will see
    figures["versus_full"] = {arm: {where: versus_full(results, arm, split) for where, split in
                                    (("held_out", "validation"), ("copies", "counterfactual"), ("test", None))}
                              for arm in figures["gap_recovered"]}
    figures["gap"] = gap_of(results)
    figures["relied_on_mark"] = bool(figures["gap"] and figures["gap"]["lo"] is not None and figures["gap"]["lo"] > 0)
    figures["outcome"] = outcome_of(results, rec.get("arm"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2))
    return figures


def _interval(c: dict | None, percent: bool = False) -> str:
    """``"+1.0 [-2.0, +4.0]"`` (errors, one decimal) or, with ``percent``, a share as ``"+20% [+14, +25]"``."""
    if not c:
        return "-"
    scale, form, unit = (100, "+.0f", "%") if percent else (1, "+.1f", "")
    mean = f"{scale * c['mean']:{form}}{unit}"
    return mean if c.get("lo") is None else f"{mean} [{scale * c['lo']:{form}}, {scale * c['hi']:{form}}]"


def markdown(rows: list[dict], pooled: dict) -> str:
    lines = ["| # | mark | cost: full->full - clean errors | found (flagged prototypes; the closest: holds / marked) | "
             "targets precision / recall | outcome | gap recovered | outcome - full->full errors | "
             "random->full | hard->full |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flags = [f for kind in r["flagged"].values() for f in kind]
        closest = max(flags, key=lambda f: f["holds"] * f["marked"], default=None)
        flagged = (f"{len(flags)} flagged; closest {closest['prototype']}: {100 * closest['holds']:.0f}% / "
                   f"{100 * closest['marked']:.0f}%" if closest else "nothing flagged")
        t = r["targets"]
        tp = "none" if "none" in t else f"{t['precision']:.2f} / {t['recall']:.2f}"
        # where the mark cost nothing, a share of its gap divides by about 0 or less: left out
        g = r["gap_recovered"] if r["gap"] and r["gap"]["mean"] > 0 else {}
        out = r["outcome"]
        cost = _interval(r["gap"]) + (" (relied on)" if r["relied_on_mark"] else "")
        lines.append(f"| {r['index']} | {r['described']} | {cost} | "
                     f"{'yes' if r['found'] else 'no'} ({flagged}) | {tp} | {out['arm']} | "
                     f"{_interval(out['gap_recovered'], percent=True)} | {_interval(out.get('versus_full'))} | "
                     f"{_interval(g.get('random->full'), percent=True)} | "
                     f"{_interval(g.get('hard->full'), percent=True)} |")
    lines += ["", "Pooled: " + "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in pooled.items()) + "."]
    return "\n".join(lines) + "\n"


def pool(rows: list[dict]) -> dict:
    """The suite's figures over marks: found, the targets' precision and recall (over every mark,
    and over the marks found), the median gap recovered (over the marks the model relied on, and
    over all), and how many outcomes were harmless."""
    def targets(rs):
        with_targets = [r["targets"] for r in rs if "none" not in r["targets"]]
        hits = sum(t["true_positives"] for t in with_targets)
        chosen = sum(t["count"] for t in with_targets)
        marked = sum(r["marked_train_images"] for r in rs)
        return f"{hits / max(1, chosen):.3f} / {hits / max(1, marked):.3f}" if rs else "-"

    def median(rs):
        gaps = [r["outcome"]["gap_recovered"]["mean"] for r in rs if r["outcome"].get("gap_recovered")]
        return f"{100 * statistics.median(gaps):+.0f}%" if gaps else "-"

    relied = [r for r in rows if r["relied_on_mark"]]
    found = [r for r in rows if r["found"]]
    return {"marks": len(rows), "relied_on": len(relied), "found": len(found),
            "found_of_relied_on": sum(r["found"] for r in relied),
            "targets_precision_recall": targets(rows), "targets_precision_recall_found": targets(found),
            "median_gap_recovered_relied_on": median(relied), "median_gap_recovered_all": median(rows),
            "harmless": sum(r["outcome"]["harmless"] for r in rows),
            "worse_than_full": [r["index"] for r in rows if r["outcome"].get("worse")],
            "missed": [r["index"] for r in rows if not r["found"]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--mark-seed", type=int, default=PUBLISHED_SEED)
    p.add_argument("--marks", type=int, default=12)
    p.add_argument("--only", default=None, help="comma-separated mark numbers to run (default all)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-size", type=int, default=PLAN.train_size)
    p.add_argument("--epochs", type=int, default=PLAN.epochs)
    p.add_argument("--scope", choices=["pair", "model"], default="model",
                   help="the loop's scope: model (chosen on the dev marks of seed 7, where the pair scope always "
                        "read the naturally confused pair and its targets missed every mark) or pair")
    p.add_argument("--with-square", action="store_true",
                   help="also run the first experiments' planted square, as mark number --marks (dev checks)")
    p.add_argument("--arms", default=",".join(ARMS), type=lambda v: tuple(v.split(",")),
                   help="comma-separated arms (default: the demo's, and clean): other arm sets are dev checks")
    p.add_argument("--publish", type=Path, default=None, help="also write PATH.json and PATH.md")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    full_train, full_test = load_dataset("fashion-mnist", train=True), load_dataset("fashion-mnist", train=False)
    train, _ = training_subset(full_train, args.train_size, seed=0)
    ctx = {"train": train, "test": full_test,
           "validation": held_out_images(full_train, args.train_size)}
    if ctx["validation"] is None:
        p.error("--train-size: leave images out of training for the validation split")
    _, clean, _ = train_run(args.out / "clean", train, epochs=args.epochs, probe_size=PLAN.probe_size,
                            n_prototypes=PLAN.n_prototypes, batch_size=PLAN.batch_size)
    ctx["clean_state"] = {k: v.detach().clone() for k, v in clean.state_dict().items()}
    marks = draw_marks(args.marks, args.mark_seed, tuple(train.image_shape[1:]), train.num_classes)
    if args.with_square:
        marks.append(FIRST_SQUARE)
    chosen = range(len(marks)) if args.only is None else [int(v) for v in args.only.split(",")]
    rows = [run_mark(i, marks[i], ctx, args) for i in chosen]
    pooled = pool(rows)
    suite = {"mark_seed": args.mark_seed, "with_square": args.with_square, "scope": args.scope, "seeds": args.seeds,
             "train_size": args.train_size,
             "epochs": args.epochs, "arms": list(args.arms), "marks": rows, "pooled": pooled}
    (args.out / "suite.json").write_text(json.dumps(suite, indent=2))
    text = markdown(rows, pooled)
    (args.out / "suite.md").write_text(text)
    if args.publish:
        args.publish.with_suffix(".json").write_text(json.dumps(suite, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
