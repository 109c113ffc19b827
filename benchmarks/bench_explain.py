"""What explanation costs: i2x's explainer against a plain forward, captum and pytorch-grad-cam,
and what explain_from adds to a training step.

    python -P benchmarks/bench_explain.py [--repeats 5] [--write benchmarks/RESULTS.md]
    pytest benchmarks/bench_explain.py --benchmark-only          (pytest-benchmark view)

Every contender gets the same model (random weights), the same inputs and the same explicit
targets; contenders are interleaved and medians reported, with ratios from this one run. Peak
memory is measured in a fresh subprocess per contender (resident memory sampled during the call,
over what model and inputs already hold).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians, machine_line, paired_overhead  # noqa: E402

from i2x.explain.explainer import Explainer  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Models and inputs


def resnet50_eval(batch: int = 16, size: int = 224, predicted_targets: bool = True):
    """Model, inputs and targets: the predicted classes, or (for memory runs, where a forward here
    would leave freed memory resident and hide the contender's own peak) seeded random classes."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(batch, 3, size, size)
    if predicted_targets:
        with torch.no_grad():
            targets = model(x).argmax(dim=1)
    else:
        targets = torch.randint(0, 1000, (batch,))
    return model, x, targets


def cifar_resnet18(num_classes: int = 10) -> torch.nn.Module:
    """torchvision's resnet18 with a CIFAR stem (3x3 stride-1 conv, no max-pool): layer4 is 4x4 at 32 px."""
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


# ---------------------------------------------------------------------------------------------
# Explain contenders (one call = maps for the whole batch, resized to the input, in [0, 1])


def plain_forward(model, x, targets):
    with torch.no_grad():
        model(x)


def make_i2x(model):
    explainer = Explainer(model, model.layer4, "gradcam")
    return lambda m, x, t: explainer.explain(x, t)


def make_captum(model):
    from captum.attr import LayerGradCam

    gradcam = LayerGradCam(model, model.layer4)

    def run(m, x, t):
        attr = gradcam.attribute(x, target=t, relu_attributions=True)[:, 0]
        up = F.interpolate(attr[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        lo = up.amin(dim=(1, 2), keepdim=True)
        rng = up.amax(dim=(1, 2), keepdim=True) - lo
        return torch.where(rng > 0, (up - lo) / rng.clamp(min=1e-30), 0.0).detach()

    return run


def make_grad_cam(model):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAM(model=model, target_layers=[model.layer4])
    return lambda m, x, t: cam(input_tensor=x, targets=[ClassifierOutputTarget(int(i)) for i in t])


EXPLAIN_CONTENDERS = {
    "plain forward": lambda model: plain_forward,
    "i2x explain": make_i2x,
    "captum LayerGradCam": make_captum,
    "pytorch-grad-cam GradCAM": make_grad_cam,
}


# ---------------------------------------------------------------------------------------------
# Training step with and without explain_from


def make_train_step(model, x, y, with_i2x: bool, explain_seconds: list | None = None):
    """One SGD step; with_i2x adds capture() + explain_from, timing explain_from's own call into
    ``explain_seconds`` (its direct cost, free of the step-to-step noise)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    explainer = Explainer(model, model.layer4, "gradcam")

    def step():
        optimizer.zero_grad(set_to_none=True)
        if with_i2x:
            with explainer.capture() as captured:
                logits = model(x)
            t0 = time.perf_counter()
            explainer.explain_from(captured, logits, y)  # raw h x w grids, as tracking stores
            if explain_seconds is not None:
                explain_seconds.append(time.perf_counter() - t0)
        else:
            logits = model(x)
        F.cross_entropy(logits, y).backward()
        optimizer.step()

    return step


def training_overhead(name: str, model, x, y, repeats: int) -> dict:
    model.train()
    explain_seconds: list[float] = []
    r = paired_overhead(make_train_step(model, x, y, False), make_train_step(model, x, y, True, explain_seconds), repeats)
    return {"case": name, "step_ms": r["base"] * 1e3, "i2x_ms": r["other"] * 1e3, "overhead": r["overhead"],
            "spread": r["spread"], "explain_from_ms": statistics.median(explain_seconds) * 1e3}


# ---------------------------------------------------------------------------------------------
# Memory, in a fresh process per contender

_MEMORY_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import bench_explain as b
from _timing import peak_rss_growth
model, x, t = b.resnet50_eval(predicted_targets=False)
run = b.EXPLAIN_CONTENDERS[sys.argv[2]](model)
print(json.dumps({"extra": peak_rss_growth(lambda: run(model, x, t))}))
"""


def peak_extra_memory(contender: str) -> int:
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-P", "-c", _MEMORY_CHILD, here, contender], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {contender} failed:\n{out.stderr}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra"])


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-repeats", type=int, default=11, help="paired rounds per training case")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--write", type=Path, help="append the tables to this Markdown file")
    args = parser.parse_args(argv)

    model, x, targets = resnet50_eval()
    runs = {name: make(model) for name, make in EXPLAIN_CONTENDERS.items()}
    medians = interleaved_medians({n: (lambda r=r: r(model, x, targets)) for n, r in runs.items()}, args.repeats)
    base = medians["plain forward"]
    memory = {} if args.skip_memory else {n: peak_extra_memory(n) for n in EXPLAIN_CONTENDERS}

    lines = ["| contender | median ms | x plain forward | peak extra memory MiB |", "|---|---|---|---|"]
    for name, sec in medians.items():
        mem = f"{memory[name] / 2**20:.0f}" if name in memory else "-"
        lines.append(f"| {name} | {sec * 1e3:.0f} | {sec / base:.3f} | {mem} |")
        print(f"{name:28s} {sec * 1e3:8.0f} ms  x{sec / base:6.3f}  mem {mem} MiB", flush=True)
    i2x_ratio = medians["i2x explain"] / base
    verdict = [
        f"- explain / plain forward = {i2x_ratio:.3f} (goal <= 1.05: {'met' if i2x_ratio <= 1.05 else 'MISSED'})",
        f"- explain vs captum: {medians['captum LayerGradCam'] / medians['i2x explain']:.2f}x faster "
        f"(goal > 1: {'met' if medians['i2x explain'] < medians['captum LayerGradCam'] else 'MISSED'})",
    ]
    if memory:
        ok = memory["i2x explain"] <= memory["captum LayerGradCam"]
        verdict.append(f"- peak memory i2x {memory['i2x explain'] / 2**20:.0f} MiB vs captum "
                       f"{memory['captum LayerGradCam'] / 2**20:.0f} MiB (goal <=: {'met' if ok else 'MISSED'})")

    train_lines = []
    if not args.skip_training:
        torch.manual_seed(0)
        cases = [
            ("resnet18 CIFAR stem, batch 64, 32x32", cifar_resnet18(), torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))),
            ("resnet50, batch 8, 224x224", torchvision.models.resnet50(weights=None), torch.randn(8, 3, 224, 224),
             torch.randint(0, 1000, (8,))),
        ]
        train_lines = ["| training step | step ms | step + explain_from ms | overhead (goal <= 3%) | per-round range "
                       "| explain_from call ms (share of step) |", "|---|---|---|---|---|---|"]
        for name, m, xb, yb in cases:
            r = training_overhead(name, m, xb, yb, args.train_repeats)
            met = "met" if r["overhead"] <= 0.03 else "MISSED"
            low, high = r["spread"]
            train_lines.append(f"| {name} | {r['step_ms']:.0f} | {r['i2x_ms']:.0f} | {r['overhead']:+.1%} ({met}) | "
                               f"{low:+.1%} .. {high:+.1%} | {r['explain_from_ms']:.1f} "
                               f"({r['explain_from_ms'] / r['step_ms']:.2%}) |")
            print(f"{name:40s} step {r['step_ms']:8.0f} ms  +i2x {r['i2x_ms']:8.0f} ms  {r['overhead']:+.1%} {met}", flush=True)

    text = (
        f"\n### Explainer on cpu, {datetime.date.today().isoformat()}\n\n"
        f"Machine: {machine_line('cpu')}. resnet50 random weights, batch 16, 224x224, gradcam at layer4, "
        f"explicit targets; medians of {args.repeats} interleaved runs. Training steps (SGD, train mode): "
        f"median of {args.train_repeats} paired rounds of the per-round ratio.\n"
        f"Command: `python -P benchmarks/bench_explain.py --repeats {args.repeats} --train-repeats {args.train_repeats}`\n\n"
        + "\n".join(lines) + "\n\n" + "\n".join(verdict) + "\n"
        + ("\n" + "\n".join(train_lines) + "\n" if train_lines else "")
    )
    print(text)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


# ---------------------------------------------------------------------------------------------
# pytest-benchmark view (one contender per test, grouped)

try:
    import pytest
except ImportError:  # the script itself needs no pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def resnet50_setup():
        return resnet50_eval()

    @pytest.mark.parametrize("contender", list(EXPLAIN_CONTENDERS))
    def test_explain_contender(benchmark, resnet50_setup, contender):
        model, x, targets = resnet50_setup
        run = EXPLAIN_CONTENDERS[contender](model)
        benchmark.group = "explain resnet50 b16 224"
        benchmark.pedantic(lambda: run(model, x, targets), rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    raise SystemExit(main())
