"""``i2x bench [MODEL]``: what explaining costs on this machine, one table from one run
(plain forward, ``Explainer.explain``, captum / pytorch-grad-cam where installed, a training step
with and without i2x's in-loop path). The work is :func:`i2x.bench.bench`."""

from __future__ import annotations

import json

from i2x.cli.common import COMMON, device_name, non_negative_int, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "bench", parents=[COMMON], help="what explaining costs: forward, explain, captum, training step",
        description="Time a plain forward, i2x's Explainer.explain, captum's LayerGradCam and pytorch-grad-cam "
                    "(when installed), and a training step with and without explainer.capture() + explain_from, "
                    "on one model with random weights; medians of interleaved rounds, ratios and peak memory.")
    p.add_argument("model", nargs="?", default="resnet18",
                   help="a torchvision classification model name (default resnet18) or module:factory")
    p.add_argument("--batch", type=positive_int, default=8, help="images per call (default 8)")
    p.add_argument("--size", type=positive_int, default=224, help="image size in px (default 224)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--dtype", default="float32",
                   help="float32, bfloat16 or float16 (CUDA only): the autocast compute dtype (default float32)")
    p.add_argument("--layer", default=None, help="the explained layer (default: layer4 of a ResNet, else the last "
                                                 "module with a 4-D output)")
    p.add_argument("--method", default="gradcam", help="gradcam, gradcam++, xgradcam, layercam or hirescam")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="head size of a torchvision model (default its own)")
    p.add_argument("--no-captum", dest="captum", action="store_false",
                   help="leave out the captum and pytorch-grad-cam rows")
    p.set_defaults(handler=run)


def run(args) -> int:
    from i2x.apps.bench import bench, format_table

    result = bench(args.model, batch=args.batch, size=args.size, device=args.device, dtype=args.dtype,
                   layer=args.layer, method=args.method, repeats=args.repeats, warmup=args.warmup,
                   captum=args.captum, num_classes=args.num_classes)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
