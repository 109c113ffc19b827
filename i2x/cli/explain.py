"""``i2x explain``, two forms:

    i2x explain RUN INDEX [--top 5] [--json]
        why does probe sample INDEX of a run look where it looks (i2x.analysis.explain_sample)
    i2x explain --model WEIGHTS IMAGE|FOLDER [IMAGE ...] [--arch NAME|module:factory|small-resnet]
                [--run RUN] [--layer L] [--out DIR] [--top K] [--size S] [--device D] [--json]
        explain image files with a model (a run folder, or a weights file with --arch):
        OUT/<stem>.png overlays and OUT/explanations.json (i2x.apps.explain_files)
"""

from __future__ import annotations

import json
from pathlib import Path

from i2x.cli.common import COMMON, add_memory_budget, device_name, positive_int

# Options of the second form only: given without --model they are a mistake, not ignored.
_FILE_OPTIONS = ("arch", "run_dir", "layer", "out", "size", "device", "method", "batch_size", "memory_budget")


def register(sub) -> None:
    p = sub.add_parser(
        "explain", parents=[COMMON],
        help="why a probe sample (RUN INDEX) or image files (--model) look where they look",
        usage="i2x explain RUN INDEX [--top K] [--json]\n"
              "       i2x explain --model WEIGHTS IMAGE|FOLDER [IMAGE ...] [--arch A] [--run RUN] [--layer L] "
              "[--out DIR] [--top K] [--size S] [--device D] [--json]",
        description="RUN INDEX: where probe sample INDEX of the run looks, its prototypes and their betas. "
                    "--model WEIGHTS IMAGE ...: the GradCAM overlay, prediction, saliency peak and (with a run's "
                    "prototypes) each prototype's share of the saliency, for image files or folders of them.")
    p.add_argument("items", nargs="*", metavar="RUN INDEX | IMAGE",
                   help="a run folder and a probe index, or (with --model) image files and folders")
    p.add_argument("--model", dest="weights", type=Path, default=None, metavar="WEIGHTS",
                   help="a run folder (model, weights, prototypes) or a weights file "
                        "(safetensors or torch; needs --arch)")
    p.add_argument("--arch", default=None, help="torchvision name, module:factory or small-resnet (a weights file)")
    p.add_argument("--run", dest="run_dir", type=Path, default=None,
                   help="a run whose prototypes, classes, layer and normalisation to use with a weights file")
    p.add_argument("--layer", default=None,
                   help="the explained layer (default: the run's, else the model's last stage)")
    p.add_argument("--out", type=Path, default=None,
                   help="where overlays and explanations.json go (default i2x-explain)")
    p.add_argument("--top", type=positive_int, default=5, help="top positions (RUN INDEX) / top classes (default 5)")
    p.add_argument("--size", type=positive_int, default=None,
                   help="model input size in px (default: the run's dataset, 28 for small-resnet, else 224)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--method", default=None, help="gradcam (default), gradcam++, xgradcam, layercam, hirescam")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="image files per forward (default: as many as --memory-budget holds, at most 256)")
    add_memory_budget(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    if args.weights is None:
        return _explain_probe_sample(args)
    return _explain_files(args)


def _explain_probe_sample(args) -> int:
    given = [f"--{name.replace('run_dir', 'run').replace('_', '-')}" for name in _FILE_OPTIONS
             if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --model WEIGHTS (explaining image files); "
                         "RUN INDEX explains a probe sample of the run")
    if len(args.items) != 2:
        raise ValueError(f"expected RUN INDEX (or --model WEIGHTS IMAGE ...), got {len(args.items)} argument(s): "
                         f"{' '.join(args.items) or 'none'}")
    run_dir, token = args.items
    try:
        index = int(token)
    except ValueError:
        raise ValueError(f"INDEX: expected an integer probe index, got {token!r} "
                         "(image files need --model WEIGHTS)") from None
    from i2x.analysis import explain_sample

    answer = explain_sample(Path(run_dir), index, top=args.top)
    print(json.dumps(answer.to_dict(), indent=2) if args.json else str(answer))
    return 0


def _explain_files(args) -> int:
    _refuse_probe_form(args.items)
    from i2x.apps.explain_files import DEFAULT_OUT, explain_files, format_explanations

    result = explain_files(args.weights, args.items, arch=args.arch, run=args.run_dir, layer=args.layer,
                           out=args.out or Path(DEFAULT_OUT), top=args.top, size=args.size, device=args.device,
                           method=args.method or "gradcam", batch_size=args.batch_size,
                           memory_budget=args.memory_budget)
    print(json.dumps(result, indent=2) if args.json else format_explanations(result, args.top))
    return 0


def _refuse_probe_form(items: list[str]) -> None:
    """``--model W RUN INDEX`` mixes the two forms: say so instead of 'image 5 does not exist'."""
    for token in items:
        if not Path(token).exists() and token.lstrip("-").isdigit():
            raise ValueError(f"INDEX {token} given with --model: --model explains image files; a probe sample is "
                             "explained by `i2x explain RUN INDEX` (without --model)")
    for token in items:
        if (Path(token) / "manifest.json").is_file():
            raise ValueError(f"{token} is a run folder, not an image or image folder: pass it as --model {token} "
                             f"or --run {token}")
