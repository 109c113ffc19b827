"""The ``i2x`` command: track saved checkpoints, analyse a run, explain one sample, show a run,
and close the loop: find the targeted training samples, run the fine-tuning experiment.

    i2x track      --run RUN --checkpoints DIR --dataset fashion-mnist --model small-resnet
    i2x analyze    RUN [--score swing] [--regression pair] [--n-pairs 3] ...
    i2x explain    RUN INDEX [--top 5] [--json]
    i2x info       RUN
    i2x curate     RUN --data fashion-mnist [--pair A B] [--rule-option KEY=VALUE ...] [--json]
    i2x experiment RUN --data fashion-mnist [--arms quick] [--seeds 5] [--json]

``i2x track`` and ``i2x experiment`` are resumable: run them again on the same folder and only
what is not finished yet is computed. ``curate`` and ``experiment`` rebuild the run's model from
the manifest (``model["build"]``, recorded when ``i2x.build_model`` made it) and load the run's
final weights (``weights.safetensors``) or ``--weights FILE``. Input errors (missing folders,
corrupt runs, bad options, weights or data that do not match the run) print one line naming the
problem and exit with status 2; a failure during the work (a torch error, a diverging loss, a
full disk) prints one line and exits with status 1.

Only argparse is imported at module level: torch and the pipeline's modules are imported by the
command that needs them.
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _add_model_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="the run folder (made by i2x track or i2x.Tracker)")
    p.add_argument("--data", required=True, help="the run's dataset by name: fashion-mnist, mnist, cifar10 or digits")
    p.add_argument("--data-root", type=Path, default=None, help="dataset folder in torchvision's layout")
    p.add_argument("--size", type=_positive_int, default=None,
                   help="resize the images to SIZE px, as the run's model was trained (default: the dataset's size)")
    p.add_argument("--weights", type=Path, default=None,
                   help="the final weights (safetensors or a torch file; default: the run's weights.safetensors)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")


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

    curate = sub.add_parser("curate", help="stage 9: the training samples that rely on a pair's flagged prototypes",
                            description="Score the training samples of a confused pair under the run's final model "
                                        "and write the targets into the run (targets.json + targets.safetensors).")
    _add_model_data_options(curate)
    curate.add_argument("--pair", nargs=2, metavar=("A", "B"), default=None,
                        help="the pair (class indices or names; default: the analysis' most confused pair)")
    curate.add_argument("--prototypes", type=_int_list, default=None,
                        help="target these prototype ids, e.g. 3,7 (default: the pair's flagged ones)")
    curate.add_argument("--rule-option", dest="rule_options", action="append", type=_key_value, default=[],
                        metavar="KEY=VALUE", help="an option of the target rule (repeatable): kinds=ambivalent,decisive "
                        "score=mass|top cam=pair|true top_q=0.2 weight=none|margin|error threshold=otsu|0.3 "
                        "max_fraction=0.5 batch_size=256")
    curate.add_argument("--json", action="store_true", help="print the summary as JSON")

    exp = sub.add_parser("experiment", help="stage 9: arms x seeds of fine-tuning from the final weights (resumable)",
                         description="Fine-tune copies of the run's final model on each arm's data, evaluate on the "
                                     "test split, and write RUN/NAME/results.json + results.md after every cell.")
    _add_model_data_options(exp)
    exp.add_argument("--arms", default="all",
                     help="comma-separated arms (full, curated, full->full, curated->full, ...), 'quick' or 'all' "
                          "(default all)")
    exp.add_argument("--seeds", type=_positive_int, default=5, help="seeds 0..N-1 (default 5)")
    exp.add_argument("--epochs-per-stage", type=_positive_int, default=1)
    exp.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default 0.1 x 0.05)")
    exp.add_argument("--batch-size", type=_positive_int, default=128)
    exp.add_argument("--perturb-mode", choices=["fill", "blur", "noise"], default="fill")
    exp.add_argument("--penalty-weight", type=float, default=1.0)
    exp.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    exp.add_argument("--name", default="experiment", help="the experiment's folder in the run (default experiment)")
    exp.add_argument("--quiet", action="store_true", help="no line per finished cell")
    exp.add_argument("--json", action="store_true", help="print the summary as JSON (implies --quiet)")
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


# ----------------------------------------------------------------------------------------------
# curate and experiment: the run's model, weights and data


def _open_run(path: Path):
    from .store import RunStore

    return RunStore.open(path)


def _run_model(store, weights: Path | None, device):
    """The run's final model: rebuilt from the manifest's build spec, the weights loaded strictly."""
    from .models import rebuild_model
    from .track import _load_into, load_weights

    spec = store.manifest["model"].get("build")
    if not isinstance(spec, dict):
        raise ValueError(
            f"run {store.path}: the model cannot be rebuilt, i2x did not build it (the manifest has no "
            "model 'build' spec; i2x.build_model records one). Use the Python API instead: i2x.find_targets "
            "and i2x.experiment take your model")
    model, _ = rebuild_model(spec)
    if weights is not None:
        state, source = load_weights(weights), weights
    else:
        try:
            state = store.read_weights()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"run {store.path} keeps no final weights (weights.safetensors): pass --weights FILE (the final "
                "checkpoint), or finish the Tracker with save_weights=True") from None
        source = store.path / "weights.safetensors"
    _load_into(model, state, source)
    if device is not None:
        import torch

        model = model.to(torch.device(device))
    return model


def _run_data(store, args, train: bool = True):
    """The run's dataset by name (one split), checked against the run: classes, channels, and for
    the training split the probe's labels at the probe's positions."""
    from .data import DATASET_INFO, load_dataset

    recorded = store.manifest["dataset"].get("name")
    if recorded in DATASET_INFO and recorded != args.data:
        raise ValueError(f"run {store.path} was tracked on {recorded!r}, not {args.data!r}: pass --data {recorded}")
    data = load_dataset(args.data, root=args.data_root, train=train, size=args.size)
    if list(data.classes) != store.classes:
        raise ValueError(f"dataset {args.data!r} has the classes {list(data.classes)} but the run has {store.classes}: "
                         "pass the dataset the run was tracked on")
    spec = store.manifest["model"].get("build") or {}
    if "in_channels" in spec and int(spec["in_channels"]) != data.images.shape[1]:
        raise ValueError(f"dataset {args.data!r} has {data.images.shape[1]} channel(s) but the run's model takes "
                         f"{spec['in_channels']}")
    if train and store.manifest["dataset"].get("split") == "train":
        idx, labels = store.probe()
        if int(idx.max()) >= len(data):
            raise ValueError(f"dataset {args.data!r} (train) has {len(data)} samples but the run's probe refers to "
                             f"index {int(idx.max())}: pass the training set the run was tracked on")
        wrong = int((data.labels[idx] != labels).sum())
        if wrong:
            raise ValueError(f"dataset {args.data!r} (train) does not match the run's probe: {wrong} of its "
                             f"{idx.numel()} samples have other labels; pass the training set the run was tracked on")
    return data


def _check_grid(model, store, data, device) -> None:
    """The model's target layer on one image must give the run's grid (else: another image size)."""
    import torch

    from ._util import eval_mode

    grid, layer = store.grid, store.manifest["model"]["layer"]
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"the rebuilt model has no layer {layer!r} (the run's target layer)") from None
    if grid is None:
        return
    seen = {}

    def hook(_module, _inputs, output):
        seen["shape"] = tuple(output.shape) if hasattr(output, "shape") else ()

    handle = module.register_forward_hook(hook)
    try:
        with eval_mode(model), torch.no_grad():
            model(data.images[:1].to(device or "cpu"))
    finally:
        handle.remove()
    shape = seen.get("shape", ())
    if len(shape) == 4 and tuple(shape[-2:]) != tuple(grid):
        size = "x".join(str(v) for v in data.images.shape[-2:])
        raise ValueError(f"{size} px images give a {shape[-2]}x{shape[-1]} grid at {layer} but the run's grid is "
                         f"{grid[0]}x{grid[1]}: load the images at the size the run was trained on (--size)")


def _class_index(store, token: str) -> int:
    names = store.classes
    if token in names:
        return names.index(token)
    try:
        c = int(token)
    except ValueError:
        raise ValueError(f"--pair: {token!r} is neither a class index nor one of the run's classes {names}") from None
    if not 0 <= c < len(names):
        raise ValueError(f"--pair: class index {c} is out of range for the run's {len(names)} classes")
    return c


def _rule_options(pairs: list[tuple[str, str]]) -> dict:
    """``--rule-option KEY=VALUE`` -> find_targets' options, typed by the defaults and checked."""
    from .curate import TARGET_DEFAULTS, _check_options

    options = {}
    for key, value in pairs:
        if key not in TARGET_DEFAULTS:
            raise ValueError(f"--rule-option {key}: unknown option; known: {', '.join(sorted(TARGET_DEFAULTS))}")
        default = TARGET_DEFAULTS[key]
        try:
            if isinstance(default, tuple):
                options[key] = tuple(v.strip() for v in value.split(",") if v.strip())
            elif key == "threshold":
                options[key] = value if value == "otsu" else float(value)
            elif isinstance(default, bool) or isinstance(default, str):
                options[key] = value
            elif isinstance(default, int):
                options[key] = int(value)
            else:
                options[key] = float(value)
        except ValueError:
            raise ValueError(f"--rule-option {key}={value}: expected {'an integer' if isinstance(default, int) else 'a number'}"
                             + (" or 'otsu'" if key == "threshold" else "")) from None
    try:
        _check_options(options)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--rule-option: {e}") from None
    return options


def _class_label(names: list[str], c: int) -> str:
    return names[c] if names[c] == str(c) else f"{c} ({names[c]})"


def _cmd_curate(args) -> int:
    from .curate import NothingToCurate, find_targets

    store = _open_run(args.run)
    options = _rule_options(args.rule_options)
    pair = None
    if args.pair is not None:
        a, b = (_class_index(store, t) for t in args.pair)
        pair = (min(a, b), max(a, b))
    model = _run_model(store, args.weights, args.device)
    train = _run_data(store, args, train=True)
    _check_grid(model, store, train, args.device)
    try:
        targets = find_targets(store, model, train, pairs=[pair] if pair is not None else None,
                               prototypes=args.prototypes, device=args.device, **options)
    except NothingToCurate as e:
        if pair is None:
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
    a, b = summary["pair"]
    print(f"i2x curate: {summary['targets']} targets among the {summary['pair_samples']} training samples of "
          f"{_class_label(names, a)} vs {_class_label(names, b)} ({100 * summary['share']:.1f}%), written to "
          f"{store.path / 'targets.json'}")
    print(f"  {'class':<16} {'samples':>7} {'targets':>7} {'share':>7} {'errors':>6} {'targeted':>8}")
    for c, v in summary["per_class"].items():
        print(f"  {_class_label(names, int(c)):<16} {v['samples']:>7} {v['targets']:>7} {100 * v['share']:>6.1f}% "
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
    from .experiment import ALL_ARMS, QUICK_ARMS, _stages

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
            _stages(arm)
        except ValueError as e:
            raise ValueError(f"--arms: {e}") from None
    return arms


def _cmd_experiment(args) -> int:
    from .experiment import experiment, results_markdown

    store = _open_run(args.run)
    arms = _arms(args.arms)
    model = _run_model(store, args.weights, args.device)
    train = _run_data(store, args, train=True)
    test = _run_data(store, args, train=False)
    _check_grid(model, store, train, args.device)
    quiet = args.quiet or args.json
    log = None if quiet else (lambda line: print(f"  {line}", flush=True))
    try:
        results = experiment(store, model, train, test, arms=arms, seeds=args.seeds,
                             epochs_per_stage=args.epochs_per_stage, lr=args.lr, batch_size=args.batch_size,
                             perturb_mode=args.perturb_mode, penalty_weight=args.penalty_weight,
                             precision=args.precision, device=args.device, name=args.name, log=log)
    except KeyboardInterrupt:
        print(f"i2x experiment: interrupted; the finished cells are in {store.path / args.name / 'results.json'}: "
              "run the same command again to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(results["summary"], indent=2))
        return 0
    cells = sum(len(e.get("seeds", {})) for e in results["arms"].values())
    print(f"i2x experiment: {store.path / args.name / 'results.json'} ({cells} cells finished)")
    print()
    print(results_markdown(results), end="")
    return 0


_COMMANDS = {"track": _cmd_track, "analyze": _cmd_analyze, "explain": _cmd_explain, "info": _cmd_info,
             "curate": _cmd_curate, "experiment": _cmd_experiment}
# Failures during the work itself (not of the input): one line and status 1 for these commands.
_WORK_COMMANDS = ("curate", "experiment")
_WORK_FAILURES = (RuntimeError, ArithmeticError, OSError, MemoryError)
_MAX_MESSAGE = 600


def _one_line(message) -> str:
    text = " ".join(str(message).split())  # e.g. load_state_dict's multi-line report
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE - 3] + "..."


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, KeyError, IndexError) as e:
        # Errors of input (missing folders, corrupt runs, bad options) as one clear line, not a traceback.
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"i2x {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except _WORK_FAILURES as e:
        if args.command not in _WORK_COMMANDS:
            raise
        print(f"i2x {args.command}: failed: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
