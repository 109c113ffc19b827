"""Stage 9 from the command line: ``i2x curate`` (the training samples that rely on a pair's
flagged prototypes), ``i2x labels`` (shortcut or class overlap: the label diagnosis of the
confused pairs) and ``i2x experiment`` (arms x seeds of fine-tuning, resumable)."""

from __future__ import annotations

import json
import os
import sys

from i2x.cli.common import (
    COMMON,
    add_memory_budget,
    add_model_data_options,
    check_grid,
    class_index,
    class_label,
    emit,
    int_list,
    key_value,
    non_negative_float,
    non_negative_int,
    open_run,
    plain_name,
    positive_float,
    positive_int,
    run_data,
    run_model,
    warnings_as_lines,
)


def register(sub) -> None:
    curate = sub.add_parser("curate", parents=[COMMON],
                            help="stage 9: the training samples that rely on a pair's flagged prototypes",
                            description="Score the training samples of a confused pair under the run's final model "
                                        "and write the targets into the run (targets.json + targets.safetensors).")
    add_model_data_options(curate)
    curate.add_argument("--pair", nargs=2, metavar=("A", "B"), default=None,
                        help="the pair (class indices or names; default: the analysis' most confused pair)")
    curate.add_argument("--scope", choices=["pair", "model"], default="pair",
                        help="pair (default): one confused pair's samples and flagged prototypes; model: every "
                             "training sample, on the prototypes the analysis' model-wide shortcut reading flagged "
                             "(max_fraction then caps each class)")
    curate.add_argument("--prototypes", type=int_list, default=None,
                        help="target these prototype ids, e.g. 3,7 (default: the pair's flagged ones)")
    curate.add_argument("--rule-option", dest="rule_options", action="append", type=key_value, default=[],
                        metavar="KEY=VALUE",
                        help="an option of the target rule (repeatable): kinds=ambivalent,decisive "
                        "score=mass|top cam=pair|true top_q=0.2 weight=none|margin|error threshold=otsu|0.3 "
                        "max_fraction=0.5 batch_size=N (default: from --memory-budget)")
    add_memory_budget(curate)
    curate.set_defaults(handler=_curate)

    labels = sub.add_parser("labels", parents=[COMMON],
                            help="shortcut or class overlap: cleanlab's label diagnosis of the most confused pairs",
                            description="For the analysis' most confused pairs, estimate how many images are likely "
                                        "mislabelled or ambiguous toward the other class (cleanlab, on cross-fitted "
                                        "probabilities of a logistic head on the final model's pooled features) and "
                                        "set it beside the shortcut reading; writes RUN/labels.json. Needs cleanlab "
                                        "(pip install 'i2x[labels]').")
    add_model_data_options(labels)
    labels.add_argument("--n-pairs", type=positive_int, default=3, help="pairs to diagnose (default 3)")
    labels.add_argument("--images", type=positive_int, default=10_000,
                        help="training images read (stratified; default 10000)")
    labels.add_argument("--folds", type=positive_int, default=5, help="cross-fitting folds (default 5, at least 2)")
    add_memory_budget(labels)
    labels.set_defaults(handler=_labels)

    exp = sub.add_parser("experiment", parents=[COMMON],
                         help="stage 9: arms x seeds of fine-tuning from the final weights (resumable)",
                         description="Fine-tune copies of the run's final model on each arm's data, evaluate on the "
                                     "test split, and write RUN/NAME/results.json + results.md after every cell.")
    add_model_data_options(exp)
    exp.add_argument("--arms", default="all",
                     help="comma-separated arms (full, curated, full->full, curated->full, ...), 'quick' or 'all' "
                          "(default all)")
    exp.add_argument("--seeds", type=positive_int, default=5, help="seeds 0..N-1 (default 5)")
    exp.add_argument("--epochs-per-stage", type=positive_int, default=1,
                     help="fine-tuning epochs of each stage of an arm (default 1)")
    exp.add_argument("--lr", type=positive_float, default=None, help="fine-tuning learning rate (default 0.1 x 0.05)")
    exp.add_argument("--batch-size", type=positive_int, default=128, help="training batch size (default 128)")
    exp.add_argument("--perturb-mode", choices=["fill", "blur", "noise"], default="fill",
                     help="how the perturbed arm hides the flagged cells (default fill)")
    exp.add_argument("--penalty-weight", type=non_negative_float, default=1.0,
                     help="weight of the explanation penalty in the penalized arm (default 1.0)")
    exp.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                     help="the fine-tuning loop's precision (auto: bfloat16 autocast where the CPU has it)")
    exp.add_argument("--scope", choices=["pair", "model"], default="pair",
                     help="pair (default): the run's pair targets, arms compared on the pair's test confusions; "
                          "model: model-wide targets (i2x curate --scope model), arms compared on all test errors")
    exp.add_argument("--hold-out", type=non_negative_int, default=None, metavar="N",
                     help="decide the recommendation on N training images the run did not train on (outside its "
                          "recorded --train-size subset) and their counterfactual copies (default: 2000, as i2x "
                          "demo does, where the run trained on a subset, else none; 0: none)")
    exp.add_argument("--name", type=plain_name, default="experiment",
                     help="the experiment's folder in the run: letters, digits, '_', '-' (default experiment)")
    add_memory_budget(exp)
    exp.set_defaults(handler=_experiment)


def _rule_options(pairs: list[tuple[str, str]]) -> dict:
    """``--rule-option KEY=VALUE`` -> find_targets' options, typed by the defaults and checked."""
    from i2x.loop.target_rule import TARGET_DEFAULTS, check_target_options

    options: dict[str, object] = {}
    for key, value in pairs:
        if key not in TARGET_DEFAULTS:
            raise ValueError(f"--rule-option {key}: unknown option; known: {', '.join(sorted(TARGET_DEFAULTS))}")
        default = TARGET_DEFAULTS[key]
        try:
            if isinstance(default, tuple):
                options[key] = tuple(v.strip() for v in value.split(",") if v.strip())
            elif key == "threshold":
                options[key] = value if value == "otsu" else float(value)
            elif isinstance(default, (bool, str)):
                options[key] = value
            elif key == "batch_size" or isinstance(default, int):
                options[key] = int(value)
            else:
                options[key] = float(value)
        except ValueError:
            raise ValueError(f"--rule-option {key}={value}: "
                             f"expected {'an integer' if isinstance(default, int) else 'a number'}"
                             + (" or 'otsu'" if key == "threshold" else "")) from None
    try:
        check_target_options(options)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--rule-option: {e}") from None
    return options


def _curate(args) -> int:
    from i2x.loop import NothingToCurate, find_targets

    store = open_run(args.run)
    options = _rule_options(args.rule_options)
    pair = None
    if args.scope == "model" and args.pair is not None:
        raise ValueError("--pair: --scope model reads every class; leave --pair out")
    if args.pair is not None:
        a, b = (class_index(store, t) for t in args.pair)
        pair = (min(a, b), max(a, b))
    model = run_model(store, args.weights, args.device)
    train = run_data(store, args, train=True)
    check_grid(model, store, train, args.device)
    try:
        targets = find_targets(store, model, train, pairs=[pair] if pair is not None else None,
                               prototypes=args.prototypes, device=args.device,
                               memory_budget=args.memory_budget, scope=args.scope, **options)
    except NothingToCurate as e:
        if pair is None and args.scope == "pair":
            first = (store.read_json("analysis").get("uncertainty") or [{}])[0].get("pair")
            pair = tuple(first) if first else None
        if args.json:
            print(json.dumps({"status": "nothing_to_curate", "pair": list(pair) if pair else None, "message": str(e)},
                             indent=2))
        else:
            print(f"i2x curate: {e}")
        return 0
    summary = targets.summary()
    if args.json:
        print(json.dumps({"status": "ok", **summary}, indent=2))
        return 0
    names = store.classes
    if summary["pair"] is None:
        where = "every class"
    else:
        a, b = summary["pair"]
        where = f"{class_label(names, a)} vs {class_label(names, b)}"
    print(f"i2x curate: {summary['targets']} targets among the {summary['pair_samples']} training samples of "
          f"{where} ({100 * summary['share']:.1f}%), written to {store.path / 'targets.json'}")
    print(f"  {'class':<16} {'samples':>7} {'targets':>7} {'share':>7} {'errors':>6} {'targeted':>8}")
    for c, v in summary["per_class"].items():
        print(f"  {class_label(names, int(c)):<16} {v['samples']:>7} {v['targets']:>7} {100 * v['share']:>6.1f}% "
              f"{v['errors']:>6} {v['errors_targeted']:>8}")
    for p in summary["prototypes"]:
        score = "" if p.get("score") is None else f", score {p['score']:.3g}"
        split = "" if p.get("separability") is None else f", separability {p['separability']:.2f}"
        used = "used" if p.get("used", True) else "not used"
        reason = str(p.get("reason") or "")
        reason = reason[len(p["kind"]) + 2:] if reason.startswith(f"{p['kind']}: ") else reason
        print(f"  prototype {p['prototype']} ({p['kind']}{score}{split}; {used}): {reason}")
    rule = summary["rule"]
    used = "" if rule.get("threshold_used") is None else f" (used {rule['threshold_used']:.3g})"
    fallback = "; no prototype split the pair cleanly, the most separable one is used" if rule.get("fallback") else ""
    print(f"  rule: select {rule['select']}, score {rule['score']}, cam {rule['cam']}, weight {rule['weight']}, "
          f"threshold {rule['threshold']}{used}, max_fraction {rule['max_fraction']:g}{fallback}")
    return 0


def _arms(text: str) -> tuple[str, ...]:
    from i2x.loop.experiments import ALL_ARMS, QUICK_ARMS, arm_stages

    if text.strip() == "quick":
        return QUICK_ARMS
    if text.strip() == "all":
        return ALL_ARMS
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    if not arms:
        raise ValueError("--arms: expected comma-separated arms, 'quick' or 'all', got nothing")
    for arm in arms:
        if arm == "clean" or "oracle" in arm.split("->"):
            raise ValueError(f"--arms: arm {arm!r} needs Python objects (clean weights and data, or known regions): "
                             "use the Python API, i2x.experiment(clean=..., oracle=...)")
        try:
            arm_stages(arm)
        except ValueError as e:
            raise ValueError(f"--arms: {e}") from None
    return arms


def _labels(args) -> int:
    from i2x.analysis.labels import diagnose_labels

    if args.folds < 2:
        raise ValueError("--folds: expected at least 2")
    store = open_run(args.run)
    model = run_model(store, args.weights, args.device)
    train = run_data(store, args, train=True)
    check_grid(model, store, train, args.device)
    result = diagnose_labels(store, model, train, n_pairs=args.n_pairs, n_images=args.images, folds=args.folds,
                             device=args.device, memory_budget=args.memory_budget)

    def text() -> str:
        lines = [f"i2x labels: {store.path / 'labels.json'} ({result['images']} training images; probabilities: "
                 f"{result['probabilities']}, {100 * result['accuracy']:.1f}% accurate; likely label issues "
                 f"{100 * result['issues']:.1f}% of all)"]
        lines += [f"  {entry['line']}" for entry in result["pairs"]]
        return "\n".join(lines)

    emit(args, {k: v for k, v in result.items() if k != "schema"}, text)
    return 0


def _held_out(store, args, model, train):
    """``(validation, counterfactual)`` for the experiment: ``--hold-out`` training images outside
    the run's recorded training subset (as ``i2x demo`` holds them out) and their counterfactual
    copies at the experiment's scope; ``(None, None)`` with ``--hold-out 0``, or by default where
    the run trained on every training image. Asked for where none is left: ValueError."""
    from i2x.data import DATASET_INFO, held_out_images, load_recorded_dataset
    from i2x.loop.held_out import counterfactual_split

    if args.hold_out == 0:
        return None, None
    record = store.manifest["dataset"]
    subset = record.get("subset") or {}
    validation = None
    if subset and record.get("name") in DATASET_INFO:
        full = load_recorded_dataset({k: v for k, v in record.items() if k != "subset"}, root=args.data_root,
                                     train=True, size=args.size)
        validation = held_out_images(full, int(subset["size"]), args.hold_out or None,
                                     subset_seed=int(subset.get("seed", 0)))
    if validation is None:
        if args.hold_out is None:
            return None, None
        why = (f"the run trained on a subset of {record.get('name')!r}, which i2x cannot load by name"
               if subset else f"the run trained on every training image of {record.get('name')!r}")
        raise ValueError(f"--hold-out {args.hold_out}: {why}, so no image is left to hold out; train on a subset "
                         "(i2x train --train-size) or give held-out images through the Python API "
                         "(i2x.experiment(validation=...))")
    return validation, counterfactual_split(store, model, validation, train, args.device, args.memory_budget,
                                            scope=args.scope)


def _experiment(args) -> int:
    from i2x.loop.experiments import experiment, results_markdown

    store = open_run(args.run)
    arms = _arms(args.arms)
    model = run_model(store, args.weights, args.device)
    train = run_data(store, args, train=True)
    test = run_data(store, args, train=False)
    check_grid(model, store, train, args.device)
    validation, counterfactual = _held_out(store, args, model, train)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: process 0 alone prints the table
    quiet = args.quiet or args.json
    where = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    log = None if quiet else (lambda line: print(f"  {where}{line}", flush=True))
    try:
        with warnings_as_lines("experiment"):
            results = experiment(store, model, train, test, arms=arms, seeds=args.seeds,
                                 epochs_per_stage=args.epochs_per_stage, lr=args.lr,
                                 batch_size=args.batch_size, perturb_mode=args.perturb_mode,
                                 penalty_weight=args.penalty_weight, precision=args.precision, device=args.device,
                                 name=args.name, log=log, memory_budget=args.memory_budget, scope=args.scope,
                                 validation=validation, counterfactual=counterfactual)
    except KeyboardInterrupt:
        print(f"i2x experiment: interrupted; the finished cells are in {store.path / args.name / 'results.json'}: "
              "run the same command again to resume", file=sys.stderr)
        return 130
    if rank != 0:
        return 0
    if args.json:
        print(json.dumps(results["summary"], indent=2))
        return 0
    cells = sum(len(e.get("seeds", {})) for e in results["arms"].values())
    print(f"i2x experiment: {store.path / args.name / 'results.json'} ({cells} cells finished)")
    print()
    print(results_markdown(results), end="")
    return 0
