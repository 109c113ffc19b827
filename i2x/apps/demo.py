"""The method end to end on a named dataset, as resumable stages: what ``i2x train`` and
``i2x demo`` run.

    data        the default data: Fashion-MNIST where its files are found, else scikit-learn's digits
    train       the small ResNet trained with an online Tracker; final weights + prototypes kept
    evaluate    the trained model on the test split (``demo.json``)
    analysis    stages 3-8 (:func:`i2x.analyze`)
    targets     stage 9's targeted training samples of the most confused pair (:func:`i2x.find_targets`)
    experiment  a small fine-tuning experiment (:func:`i2x.experiment`, resumable cell by cell)
    report      ``RUN/report/index.html`` (:func:`i2x.report.write_report`)

A second call on the same folder reuses every finished stage (each is recorded in the run's
manifest only once its files are in place), so an interrupted demo resumes where it stopped; the
training stage restarts from its seed when it was interrupted, and the Tracker skips the
checkpoints it already recorded.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from i2x._internal import progress as _progress
from i2x._internal.checks import check_int
from i2x._internal.memory import check_memory_budget
from i2x._internal.modules import layer_output_shape
from i2x._internal.weights import load_state_into
from i2x.analysis import analyze
from i2x.data import held_out_images, load_dataset, training_subset
from i2x.loop import ALL_ARMS, NothingToCurate, experiment, find_targets
from i2x.loop.experiments import check_arms
from i2x.loop.held_out import counterfactual_split
from i2x.loop.training import TRAIN_LR, calibration_images, evaluate
from i2x.loop.training import train as train_model
from i2x.models import build_model
from i2x.report import write_report
from i2x.store import RunStore
from i2x.track import Probe, Tracker
from i2x.track.prototypes import MAX_FIT_POSITIONS

__all__ = ["DemoPlan", "DEMO_PLANS", "default_data", "train_run", "demo", "summary_lines"]

TRAIN_STAGE_SCHEMA = 1


@dataclass(frozen=True)
class DemoPlan:
    """How big the demo is. ``min_steps``: at least this many optimiser steps, whatever the data
    size (scikit-learn's digits hold only 1,437 training images)."""

    train_size: int | None
    test_size: int | None
    epochs: int
    min_steps: int
    probe_size: int
    n_prototypes: int
    arms: tuple[str, ...]
    seeds: int
    batch_size: int = 128


# Measured on 2 CPU cores (benchmarks/RESULTS.md): 2 min 14 s for "default" where the CPU has native
# bfloat16 (about 6 min estimated in float32), 37 s for "quick".
DEMO_PLANS = {
    "default": DemoPlan(train_size=12_000, test_size=None, epochs=4, min_steps=400, probe_size=2_000, n_prototypes=16,
                        arms=("full->full", "curated->full", "transplanted->full", "random->full", "hard->full"),
                        seeds=2),
    "quick": DemoPlan(train_size=3_000, test_size=2_000, epochs=2, min_steps=120, probe_size=500, n_prototypes=12,
                      arms=("full->full", "curated->full", "random->full"), seeds=1),
}
# The full experiment (``i2x demo --full``): every arm, 5 seeds, on the demo's data and model.
FULL_SEEDS = 5


def default_data(name: str | None = None, root=None, size: int | None = None):
    """``(train, test, why)``: the named dataset, or the default one: Fashion-MNIST where its files
    are found (Debian's ``dataset-fashion-mnist``, ``root``, ...), else scikit-learn's digits
    upsampled to 28 x 28. ``why`` says which and why, for the user."""
    if name is not None:
        return (load_dataset(name, root=root, train=True, size=size), load_dataset(name, root=root, train=False,
                                                                                    size=size), f"{name} (as asked)")
    try:
        train = load_dataset("fashion-mnist", root=root, train=True, size=size)
        test = load_dataset("fashion-mnist", root=root, train=False, size=size)
        return train, test, "fashion-mnist (found on this machine)"
    except FileNotFoundError:
        train = load_dataset("digits", train=True, size=size)
        test = load_dataset("digits", train=False, size=size)
        return train, test, ("digits (scikit-learn's 8 x 8 digits upsampled to 28 x 28: Fashion-MNIST was not "
                             "found; `apt-get install dataset-fashion-mnist` gives it)")


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def _check_prototype_count(net, layer: str, train, probe_size: int, n_prototypes: int) -> None:
    """k-means needs at least ``n_prototypes`` probe positions (probe images x the layer's grid)."""
    check_int(n_prototypes, "n_prototypes")
    h, w = layer_output_shape(net, layer, train.images[:1])[-2:]
    probe = min(probe_size, len(train))
    positions = min(probe * h * w, MAX_FIT_POSITIONS)
    if n_prototypes > positions:
        raise ValueError(f"n_prototypes: {n_prototypes} is more than the {positions} probe positions the prototypes "
                         f"are fitted on ({probe} probe images x a {h}x{w} grid at {layer}); use at most {positions}")


def train_run(run_dir, train, *, model: str = "small-resnet", widths=None, epochs: int = 4, probe_size: int = 2_000,
              n_prototypes: int = 16, lr: float | None = None, batch_size: int = 128, seed: int = 0,
              dataset_record: dict | None = None, device=None, precision: str = "auto",
              memory_budget: float | None = None):
    """Stages 1-2 on ``train``: build the model (seeded), train it with an online
    :class:`i2x.Tracker` (log-spaced checkpoints), fit the prototypes and keep the final weights.

    Resumable: when the run already holds its final weights and prototypes, the model is rebuilt
    and loaded instead (the Tracker first checks that the folder holds this same run). Returns
    ``(store, model, layer)``.
    """

    run_dir = Path(run_dir)
    torch.manual_seed(seed)
    options = {"widths": tuple(widths)} if widths else {}
    net, layer = build_model(model, train.num_classes, in_channels=train.image_shape[0], **options)
    _check_prototype_count(net, layer, train, probe_size, n_prototypes)  # before any training, not after it
    if device is not None:
        net = net.to(torch.device(device))
    probe = Probe.from_dataset(train, size=min(probe_size, len(train)), seed=0)
    probe.dataset.update(dataset_record or {})
    steps = epochs * _steps_per_epoch(len(train), batch_size)
    tracker = Tracker(net, layer, probe, run_dir, planned_steps=steps, model_name=model, device=device,
                      progress=True, memory_budget=memory_budget)
    store = tracker.store
    assert store is not None  # one process: it is rank 0, which holds the run
    if store.has("prototypes") and store.has("weights") and store.stage("train") is not None:
        load_state_into(net, store.read_weights(), run_dir / "weights.safetensors")
        store.release()
        _progress.log(f"i2x: train: reused the trained model in {run_dir}")
        return store, net, layer
    started = time.perf_counter()
    stats = train_model(net, train, epochs, lr=TRAIN_LR if lr is None else lr, batch_size=batch_size, seed=seed,
                        tracker=tracker, precision=precision, device=device, progress=True)
    tracker.finish(stats.steps, prototypes={"n_prototypes": n_prototypes}, save_weights=True)
    store.record_stage("train", {"schema_version": TRAIN_STAGE_SCHEMA, "epochs": int(epochs), "steps": int(stats.steps),
                                 "samples": len(train), "batch_size": int(batch_size), "seed": int(seed),
                                 "lr": TRAIN_LR if lr is None else float(lr), "seconds": time.perf_counter() - started})
    store.release()
    return store, net, layer


def demo(folder=None, *, quick: bool = False, full: bool = False, data: str | None = None, root=None,
         arms=None, seeds: int | None = None, train_size: int | None = None, epochs: int | None = None,
         device=None, precision: str = "auto", report: bool = True, memory_budget: float | None = None) -> dict:
    """The whole method on the default data (see the module docstring), resumable.

    quick: the small plan (under two minutes on 2 cores); full: every arm and 5 seeds.
    memory_budget: MiB one explain or evaluation batch may use (default 256; docs/memory.md).
    arms / seeds / train_size / epochs override the plan; precision ("auto", "bf16", "fp32") is
    the training loop's, for the base model and every fine-tuning cell. Returns the summary dict (also
    written to ``FOLDER/demo.json``); :func:`summary_lines` turns it into the summary lines."""

    folder = Path(folder if folder is not None else ("i2x-demo-quick" if quick else "i2x-demo"))
    plan = DEMO_PLANS["quick" if quick else "default"]
    if full:
        plan = replace(plan, arms=ALL_ARMS, seeds=FULL_SEEDS)
    overrides: dict[str, Any] = {"arms": tuple(arms) if arms else None, "seeds": seeds, "train_size": train_size,
                                 "epochs": epochs}
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    # Every option is checked before minutes of training: the demo has no clean model and no known regions.
    check_memory_budget(memory_budget)
    try:
        check_arms(plan.arms)
    except ValueError as e:
        raise ValueError(f"arms: {e}; the demo runs arms such as {', '.join(DEMO_PLANS['default'].arms)}") from None
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 2)
        clock = now

    full_train, full_test, why = default_data(data, root)
    _progress.log(f"i2x demo: data: {why}")
    train, record = training_subset(full_train, plan.train_size, seed=0)
    test, _ = training_subset(full_test, plan.test_size, seed=0)
    validation = held_out_images(full_train, plan.train_size)
    epochs_needed = max(plan.epochs, math.ceil(plan.min_steps / _steps_per_epoch(len(train), plan.batch_size)))
    lap("data")

    _progress.log(f"i2x demo: train: small ResNet on {len(train)} {train.name} images, {epochs_needed} epochs, "
                  f"tracking {min(plan.probe_size, len(train))} probe images")
    store, model, _ = train_run(folder, train, epochs=epochs_needed, probe_size=plan.probe_size,
                                n_prototypes=plan.n_prototypes, batch_size=plan.batch_size,
                                dataset_record=record, device=device, precision=precision,
                                memory_budget=memory_budget)
    lap("train")

    store = RunStore.open(folder)  # the stages below write through their own store objects
    previous = store.read_json("demo") if store.has("demo") else {}
    base = previous.get("evaluation")
    if base is None or base.get("n") != len(test):
        base = evaluate(model, test, calibration_images(train), device=device, num_classes=train.num_classes,
                        memory_budget=memory_budget)
    lap("evaluate")

    if not store.has("analysis"):
        _progress.log("i2x demo: analysis: beta^t, groups, timeline, uncertain prototypes")
        analyze(store.path)
    analysis = store.refresh().read_json("analysis")
    lap("analysis")

    pair_entry = (analysis.get("uncertainty") or [None])[0]
    diagnosis = _label_diagnosis(store, model, train, device, memory_budget) if pair_entry is not None else None
    lap("labels")
    targets_summary = None
    results = None
    if pair_entry is not None:
        if not store.has("targets"):
            _progress.log(f"i2x demo: targets: the training samples of {pair_entry['names'][0]} vs "
                          f"{pair_entry['names'][1]} that rely on the flagged prototypes")
            try:
                targets_summary = find_targets(store.path, model, train, device=device, progress=True,
                                               memory_budget=memory_budget).summary()
            except NothingToCurate as e:
                targets_summary = {"status": "nothing_to_curate", "message": str(e)}
        else:
            from i2x.loop.targets import load_targets

            try:
                targets_summary = load_targets(store.path).summary()
            except NothingToCurate as e:
                targets_summary = {"status": "nothing_to_curate", "message": str(e)}
        counterfactual = None
        if validation is not None and targets_summary.get("status") != "nothing_to_curate":
            counterfactual = counterfactual_split(store, model, validation, train, device, memory_budget)
        lap("targets")
        store.refresh()
        _progress.log(f"i2x demo: experiment: {len(plan.arms)} arms x {plan.seeds} seed(s), one epoch per stage")
        results = experiment(store.path, model, train, test, arms=plan.arms, seeds=plan.seeds, validation=validation,
                             counterfactual=counterfactual, batch_size=plan.batch_size, precision=precision,
                             device=device, progress=True, log=lambda line: _progress.log(f"  {line}"),
                             memory_budget=memory_budget)
        lap("experiment")

    summary = {
        "run": str(store.path), "data": why, "dataset": train.name, "train_samples": len(train),
        "test_samples": len(test), "plan": asdict(plan), "epochs": epochs_needed, "evaluation": base,
        "pair": _pair_summary(pair_entry, base, train.classes),
        "shortcuts": _shortcut_summary(analysis),
        "diagnosis": diagnosis,
        "targets": targets_summary and {k: targets_summary.get(k) for k in ("status", "targets", "pair_samples",
                                                                              "share", "message")
                                        if k in targets_summary},
        "best_arm": _best_arm(results),
        "timings": {**previous.get("timings", {}), **timings},
    }
    store.refresh().write_json("demo", _json_clean(summary))
    if report:

        _progress.log("i2x demo: report")
        summary["report"] = str(write_report(store.path, dataset=train))
        lap("report")
        summary["timings"]["report"] = timings["report"]
    store.release()
    return summary


def _label_diagnosis(store, model, train, device, memory_budget) -> dict:
    """``i2x labels`` for the demo's pair (shortcut or class overlap), when cleanlab is installed;
    reused when the run holds it. Returns the pair's verdict and line, or why there is none."""
    from i2x.analysis.labels import diagnose_labels

    if store.has("labels"):
        result = store.read_json("labels")
    else:
        try:
            import cleanlab  # noqa: F401
        except ImportError:
            return {"status": "unavailable", "line": "not run: the label diagnosis needs cleanlab "
                                                     "(pip install 'i2x[labels]')"}
        _progress.log("i2x demo: labels: shortcut or class overlap (cleanlab on cross-fitted probabilities)")
        result = diagnose_labels(store.path, model, train, n_pairs=1, device=device, memory_budget=memory_budget)
        store.refresh()
    entry = result["pairs"][0]
    return {"status": "done", "verdict": entry["verdict"], "line": entry["line"], "issue_share": entry["issue_share"]}


def _shortcut_summary(analysis: dict) -> list[dict] | None:
    """The model-wide reading's flagged prototypes, strongest first (None: the analysis has none)."""
    reading = analysis.get("shortcuts")
    if reading is None:
        return None
    flagged = [{"prototype": p["prototype"], "class": entry["name"], "score": p["score"]}
               for entry in reading["per_class"] for p in entry["flagged"]]
    return sorted(flagged, key=lambda p: -p["score"])


def _pair_summary(entry, evaluation, classes) -> dict | None:
    if entry is None:
        return None
    a, b = entry["pair"]
    conf = evaluation["confusion"]
    return {"pair": [a, b], "names": [classes[a], classes[b]], "test_confusions": int(conf[a][b] + conf[b][a]),
            "probe_confusions": entry.get("hard_confusions"),
            "uncertain": [{"prototype": f["prototype"], "score": f["score"]} for f in entry.get("flagged", [])],
            "decisive": [{"prototype": f["prototype"], "score": f["score"]} for f in entry.get("decisive", [])]}


_CONTROLS = ("full->full", "full", "random->full", "random", "hard->full", "hard", "pairup->full", "pairup")


def _best_arm(results: dict | None) -> dict | None:
    """The arm the experiment recommends (decided on held-out images), else the explanation arm
    with the fewest test pair confusions; with its test comparisons to the controls. Oracle arms
    (they need the true mark) are never the one."""
    if not results:
        return None
    summary = results.get("summary") or {}
    candidates = {arm: s for arm, s in summary.items()
                  if arm not in _CONTROLS and arm != "clean" and "oracle" not in arm.split("->")}
    if not candidates:
        return None
    rec = results.get("recommendation") or {}
    arm = rec.get("arm") or min(candidates, key=lambda k: candidates[k]["pair_confusions_mean"])
    entry = candidates[arm]
    against = {ref: {"pair_confusions": c["pair_confusions"], "accuracy_points": c["accuracy_points"]}
               for ref, c in entry.get("comparisons", {}).items()}
    return {"arm": arm, "pair_confusions_mean": entry["pair_confusions_mean"], "accuracy_mean": entry["accuracy_mean"],
            "seeds": entry["seeds"], "against": against, "beats_controls": _beats(against),
            "recommended": bool(rec.get("arm")), "recommendation": rec.get("reason"),
            "validation_size": results.get("config", {}).get("validation_size"),
            # arms that won only with the counterfactual copies, worse than full->full on the plain
            # held-out images (the recommendation refuses them; the line says so)
            "refused": rec.get("refused") or {},
            "counterfactual_size": results.get("config", {}).get("counterfactual_size")}


def _beats(against: dict) -> bool:
    """Whether an arm beat every control it was compared with: fewer test pair confusions, the 95%
    interval of the paired difference below zero. One seed gives no interval, so it never does."""
    if not against:
        return False
    return all(c["pair_confusions"].get("hi") is not None and c["pair_confusions"]["hi"] < 0 for c in against.values())


def _json_clean(obj):
    """NaN/inf (no JSON for them) as None, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    return obj


def _interval(c: dict) -> str:
    if c.get("lo") is None:
        return f"{c['mean']:+.1f}"
    return f"{c['mean']:+.1f} [{c['lo']:+.1f}, {c['hi']:+.1f}]"


def summary_lines(summary: dict) -> list[str]:
    """The demo's seven-line summary: accuracy, the model-wide shortcut reading, the pair, its
    uncertain prototypes, the label diagnosis of the pair, the targets, and the best arm against
    its controls."""
    ev = summary["evaluation"]
    lines = [f"accuracy      {100 * ev['accuracy']:.1f}% on {ev['n']} test images ({summary['dataset']}, "
             f"{summary['train_samples']} training images, {summary['epochs']} epochs)"]
    shortcuts = summary.get("shortcuts")
    if shortcuts is not None:
        shown = "; ".join(f"prototype {p['prototype']} for {p['class']} (S={p['score']:.2g})" for p in shortcuts[:3])
        more = f" and {len(shortcuts) - 3} more" if len(shortcuts) > 3 else ""
        lines.append(f"shortcuts     {shown}{more} (model-wide reading)" if shortcuts else
                     "shortcuts     none flagged by the model-wide reading")
    pair = summary.get("pair")
    if pair is None:
        lines += ["pair          no confused pair with uncertain prototypes: nothing to curate"]
        return lines
    a, b = pair["names"]
    lines.append(f"pair          {a} vs {b}: {pair['test_confusions']} test confusions (the most confused pair)")
    uncertain = ", ".join(f"{p['prototype']} (U={p['score']:.2g})" for p in pair["uncertain"]) or "none flagged"
    lines.append(f"uncertain     prototypes {uncertain}")
    diagnosis = summary.get("diagnosis")
    if diagnosis is not None:
        lines.append(f"diagnosis     {diagnosis['line']}")
    t = summary.get("targets") or {}
    if t.get("status") == "nothing_to_curate":
        lines.append(f"targets       none: {t.get('message')}")
    else:
        lines.append(f"targets       {t.get('targets')} of the pair's {t.get('pair_samples')} training samples "
                     f"({100 * (t.get('share') or 0):.1f}%)")
    best = summary.get("best_arm")
    if best is None:
        lines.append("best arm      no explanation arm finished")
        return lines
    refs = "; ".join(f"vs {ref} {_interval(c['pair_confusions'])}" for ref, c in best["against"].items())
    n = len(best["seeds"])
    stats = "one seed: no interval" if n == 1 else f"{n} seeds, 95% t-intervals"
    what = f"{best['arm']}: {best['pair_confusions_mean']:.1f} test pair confusions ({refs}; {stats})"
    # An arm is recommended only where the held-out images say it beat every control; the test
    # numbers are then what it did on data no choice looked at.
    held = best.get("validation_size")
    moved = f" + {best['counterfactual_size']} counterfactual copies" if best.get("counterfactual_size") else ""
    if best.get("recommended"):
        lines.append(f"recommended   {what} (chosen on {held} held-out training images{moved})")
    elif held and best.get("refused"):
        refused = "; ".join(f"{arm} {_interval(plain) if plain else '(no full->full)'}"
                            for arm, plain in best["refused"].items())
        lines.append(f"no arm won    the copies favoured an arm no better than full->full on the {held} plain "
                     f"held-out images ({refused}): keep the model; the lowest on test was {what}")
    elif held:
        lines.append(f"no arm won    none beat the controls on {held} held-out training images{moved}: keep the model; "
                     f"the lowest on test was {what}")
    elif best.get("beats_controls"):  # results from before the held-out images
        lines.append(f"best arm      {what}")
    else:
        lines.append(f"no arm won    none beat the controls; the lowest was {what}")
    return lines
