"""What explaining costs: one table, one run, on the machine at hand (``i2x bench``).

Rows, all on the same model (random weights), the same seeded inputs and the same targets:

explain rows (ratio against the plain forward)
    ``plain forward``: ``model(x)`` in eval mode under ``torch.no_grad()``;
    ``i2x explain``: :meth:`i2x.Explainer.explain` (maps resized to the input, min-max);
    ``captum LayerGradCam``: captum's GradCAM + bilinear upsample + min-max (when captum is installed);
    ``pytorch-grad-cam GradCAM``: its ``GradCAM`` call (when the package is installed).
training rows (ratio against the plain training step)
    ``training step``: forward + cross-entropy backward + SGD step, train mode;
    ``training step + i2x``: the same step with the forward under ``explainer.capture()`` and
    ``explainer.explain_from`` before the backward (i2x's in-loop path).

Rows are timed interleaved (each round runs every row once, the order rotating), so a slow phase
of a shared machine hits all rows alike; medians and minima are reported. Peak memory is measured
in a separate pass, one call per row: on CUDA ``max_memory_allocated`` over what was allocated
before the call; on the CPU the growth of the process's resident high-water mark (``VmHWM``,
reset through ``/proc/self/clear_refs`` after returning freed heap pages with ``malloc_trim``),
checked to work before it is used and reported as unavailable otherwise.

``dtype`` is the compute dtype of the forward and backward passes: parameters and inputs stay
float32, ``bfloat16`` / ``float16`` run every row under ``torch.autocast`` (float16 only on CUDA,
its training step with a ``GradScaler``), and i2x weights the channels in float32 either way.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import gc
import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from i2x._internal.checks import check_int, describe
from i2x._internal.heap import release_freed_heap
from i2x._internal.modules import choose_layer
from i2x._loader import build_info
from i2x.explain import Explainer
from i2x.models import input_channels, load_model
from i2x.reference import CAM_METHODS

__all__ = ["bench", "format_table", "explain_contenders", "cpu_memory_check", "cpu_peak_growth", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
DTYPE_MEANING = ("compute dtype of forward and backward: parameters and inputs stay float32, bfloat16/float16 "
                 "run under torch.autocast; i2x weights the channels in float32")
_MIB = float(1 << 20)
# The CPU memory self-check allocates this much and expects to read it back within the tolerance.
_PROBE_BYTES = 64 << 20
_PROBE_TOLERANCE = 16 << 20

# Row names (the keys of the result's rows, in table order).
FORWARD = "plain forward"
I2X_EXPLAIN = "i2x explain"
CAPTUM = "captum LayerGradCam"
GRAD_CAM = "pytorch-grad-cam GradCAM"
TRAIN = "training step"
TRAIN_I2X = "training step + i2x"
_DESCRIPTIONS = {
    FORWARD: "model(x), eval, no_grad",
    I2X_EXPLAIN: "Explainer.explain: maps at input size, min-max",
    CAPTUM: "LayerGradCam(relu) + bilinear upsample + min-max",
    GRAD_CAM: "GradCAM(...)(x, targets)",
    TRAIN: "forward + cross-entropy backward + SGD step",
    TRAIN_I2X: "the same, forward under capture() + explain_from",
}


# ----------------------------------------------------------------------------------------------
# Arguments


def _check_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r} ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def _check_dtype(dtype, device: torch.device) -> str:
    name = _DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)} (or {', '.join(_DTYPE_ALIASES)}), got {dtype!r}")
    if name == "float16" and device.type != "cuda":
        raise ValueError("dtype: float16 needs CUDA (CPU autocast runs in bfloat16); pass dtype='bfloat16' on the CPU")
    return name


def _check_method(method) -> str:
    if method not in CAM_METHODS:
        raise ValueError(f"method: expected one of {list(CAM_METHODS)}, got {method!r}")
    return method


def _dry_run(model: nn.Module, layer: str, x: torch.Tensor, autocast) -> tuple[torch.Tensor, tuple[int, int]]:
    """One eval forward: the logits and the layer's grid, or an error naming ``size``."""
    seen = {}

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            seen["shape"] = tuple(output.shape)

    handle = model.get_submodule(layer).register_forward_hook(hook)
    size = x.shape[-1]
    try:
        with torch.no_grad(), autocast():
            logits = model(x)
    except RuntimeError as e:
        raise ValueError(f"size: {size} px is too small (or the wrong shape) for this model: "
                         f"{' '.join(str(e).split())[:300]}") from None
    finally:
        handle.remove()
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"model: its output is {describe(logits)}, not [B, classes] logits; bench needs a classifier")
    shape = seen.get("shape", ())
    if len(shape) != 4:
        raise ValueError(f"layer {layer!r} gives {shape or 'no tensor'}, not a [B, C, h, w] grid; name another layer")
    if shape[2] * shape[3] <= 1:
        raise ValueError(f"size: at {size} px layer {layer!r} is a {shape[2]}x{shape[3]} grid, "
                         "which localises nothing; pass a larger size")
    return logits.float(), (int(shape[2]), int(shape[3]))


# ----------------------------------------------------------------------------------------------
# The contenders: each returns a no-argument callable the timer runs


def _autocast_factory(device: torch.device, dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=DTYPES[dtype])


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1]; a constant map becomes zeros (as ``ops.upsample_normalize``)."""
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / span.clamp(min=1e-30), torch.zeros_like(maps))


def explain_contenders(model: nn.Module, layer: str, method: str = "gradcam", *, dtype: str = "float32",
                       device="cpu", third_party: bool = True) -> tuple[dict[str, Callable], dict[str, str]]:
    """The explain rows as callables ``fn(x, targets) -> [B, H, W]`` maps in [0, 1] (None for the
    plain forward), and the third-party rows left out with the reason. ``model`` must be in eval
    mode; pytorch-grad-cam gets its own copy (it keeps hooks on the model it is given)."""
    autocast = _autocast_factory(torch.device(device), dtype)
    explainer = Explainer(model, layer, method)

    def forward(x, t):
        with torch.no_grad(), autocast():
            model(x)

    def i2x_explain(x, t):
        with autocast():
            return explainer.explain(x, t)

    fns = {FORWARD: forward, I2X_EXPLAIN: i2x_explain}
    skipped = {}
    if not third_party:
        return fns, {CAPTUM: "left out (captum=False)", GRAD_CAM: "left out (captum=False)"}
    if importlib.util.find_spec("captum") is not None:
        fns[CAPTUM] = _captum_fn(model, layer, autocast)
    else:
        skipped[CAPTUM] = "captum is not installed"
    if importlib.util.find_spec("pytorch_grad_cam") is not None:
        fns[GRAD_CAM] = _grad_cam_fn(copy.deepcopy(model), layer, autocast)
    else:
        skipped[GRAD_CAM] = "pytorch-grad-cam (grad-cam) is not installed"
    return fns, skipped


def _captum_fn(model, layer, autocast):
    from captum.attr import LayerGradCam

    gradcam = LayerGradCam(model, model.get_submodule(layer))

    def run(x, t):
        with autocast():
            attr = gradcam.attribute(x, target=t, relu_attributions=True)
        up = F.interpolate(attr.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return _min_max(up.detach())

    return run


def _grad_cam_fn(model, layer, autocast):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAM(model=model, target_layers=[model.get_submodule(layer)])

    def run(x, t):
        with autocast():
            return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(i)) for i in t]))

    return run


def _training_step(model: nn.Module, layer: str, method: str, x, y, device, dtype: str, with_i2x: bool):
    """One SGD step on ``model`` (train mode); with_i2x adds capture() + explain_from."""
    autocast = _autocast_factory(device, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if dtype == "float16" else None  # float16 needs loss scaling
    explainer = Explainer(model, layer, method)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            if with_i2x:
                with explainer.capture() as captured:
                    logits = model(x)
                explainer.explain_from(captured, logits, y)  # raw grids, as tracking stores them
            else:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


# ----------------------------------------------------------------------------------------------
# Timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device
) -> dict[str, list[float]]:
    """Seconds of every call, per row; each round runs every row once, the order rotating so no
    row always follows the same (memory-hungry) one."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"/proc/self/status has no {key}")


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next call's allocations
    show up as resident growth instead of reusing pages the process already holds."""
    gc.collect()
    release_freed_heap()


def cpu_peak_growth(fn: Callable[[], object]) -> int:
    """Bytes the resident high-water mark rises over the resident size during ``fn()``."""
    _release_freed_memory()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
    start = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - start)


def cpu_memory_check() -> tuple[bool, str]:
    """Whether the CPU peak measurement works here: after raising the high-water mark once, a
    64 MiB allocation must read back as 64 MiB (a reset that fails would read the earlier peak)."""
    try:
        cpu_peak_growth(lambda: torch.ones(2 * _PROBE_BYTES // 4))
        growth = cpu_peak_growth(lambda: torch.ones(_PROBE_BYTES // 4))
    except OSError as e:
        return False, f"n/a: the resident high-water mark cannot be reset or read here ({e})"
    if abs(growth - _PROBE_BYTES) > _PROBE_TOLERANCE:
        return False, (f"n/a: the high-water-mark self-check read {growth / _MIB:.0f} MiB for a "
                       f"{_PROBE_BYTES / _MIB:.0f} MiB allocation")
    return True, (f"growth of the process's peak resident memory (VmHWM, reset via /proc/self/clear_refs) "
                  f"during one call; self-check read {growth / _MIB:.1f} MiB for {_PROBE_BYTES / _MIB:.0f} MiB")


def _cuda_peak_growth(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - start)


def _peak_memory(fns: dict[str, Callable[[], object]], device: torch.device) -> tuple[dict[str, float | None], str]:
    """Peak MiB per row (one call each) and how it was measured."""
    if device.type == "cuda":
        how = "torch.cuda.max_memory_allocated over the allocation before the call (reset_peak_memory_stats)"
        return {n: _cuda_peak_growth(fn, device) / _MIB for n, fn in fns.items()}, how
    works, how = cpu_memory_check()
    if not works:
        return dict.fromkeys(fns), how
    return {n: cpu_peak_growth(fn) / _MIB for n, fn in fns.items()}, how


# ----------------------------------------------------------------------------------------------
# The machine


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:

    info = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "i2x": build_info()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------------------------
# The benchmark


def bench(model="resnet18", *, batch: int = 8, size: int = 224, device="cpu", dtype: str = "float32", layer=None,
          method: str = "gradcam", repeats: int = 5, warmup: int = 1, captum: bool = True,
          num_classes: int | None = None) -> dict:
    """Time (and measure the peak memory of) explaining ``model`` against a plain forward, and
    i2x's in-loop path against a plain training step; see the module docstring for the rows.

    Args:
        model: a torchvision classification model name (random weights), ``"module:factory"``
            or an ``nn.Module`` (copied; yours is not touched).
        batch, size: the input ``[batch, C, size, size]`` (C: the first conv's input channels).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``float32``, ``bfloat16`` (autocast) or ``float16`` (autocast, CUDA only).
        layer: the explained layer (default: ResNet's ``layer4``, else the last module with a 4-D
            output larger than 1 x 1); ``method``: the CAM method of the i2x rows.
        repeats, warmup: timed and untimed rounds.
        captum: also time captum's LayerGradCam and pytorch-grad-cam's GradCAM where installed.
        num_classes: the head's size for a torchvision model (default: its own, 1000).

    Returns:
        A JSON-safe dict: the configuration, ``machine``, ``memory`` (how it was measured),
        ``rows`` (name, group, description, baseline, times_ms, median_ms, min_ms, ratio,
        peak_mib) and ``skipped`` (row -> reason).
    """
    batch = check_int(batch, "batch")
    size = check_int(size, "size")
    repeats = check_int(repeats, "repeats")
    warmup = check_int(warmup, "warmup", minimum=0)
    method = _check_method(method)
    dev = _check_device(device)
    dtype = _check_dtype(dtype, dev)
    if not isinstance(captum, bool):
        raise TypeError(f"captum: expected a bool, got {describe(captum)}")
    net, source = load_model(model, num_classes)
    net = net.to(dev).eval()
    channels = input_channels(net)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(dev)
    layer_name, layer_source = choose_layer(net, layer, x)
    logits, grid = _dry_run(net, layer_name, x, _autocast_factory(dev, dtype))
    classes = int(logits.shape[1])
    targets = logits.argmax(dim=1)  # the explain rows explain the predicted classes
    labels = torch.randint(0, classes, (batch,), generator=gen).to(dev)

    explain_fns, skipped = explain_contenders(net, layer_name, method, dtype=dtype, device=dev, third_party=captum)
    calls: dict[str, Callable[[], object]] = {
        name: functools.partial(fn, x, targets) for name, fn in explain_fns.items()
    }
    _drop_failing_third_party(calls, skipped)
    calls[TRAIN] = _training_step(copy.deepcopy(net), layer_name, method, x, labels, dev, dtype, with_i2x=False)
    calls[TRAIN_I2X] = _training_step(copy.deepcopy(net), layer_name, method, x, labels, dev, dtype, with_i2x=True)

    times = _interleaved_times(calls, repeats, warmup, dev)
    peaks, memory_how = _peak_memory(calls, dev)
    rows = _rows(times, peaks)
    return {
        "model": model if isinstance(model, str) else type(model).__name__,
        "model_source": source,
        "parameters": sum(p.numel() for p in net.parameters()),
        "num_classes": classes,
        "input": [batch, channels, size, size],
        "batch": batch,
        "size": size,
        "layer": layer_name,
        "layer_source": layer_source,
        "grid": list(grid),
        "method": method,
        "device": str(dev),
        "dtype": dtype,
        "dtype_meaning": DTYPE_MEANING,
        "repeats": repeats,
        "warmup": warmup,
        "targets": "explain rows: the predicted classes; training rows: seeded random labels",
        "memory": {"available": all(p is not None for p in peaks.values()), "method": memory_how},
        "machine": machine_info(dev),
        "date": datetime.date.today().isoformat(),
        "rows": rows,
        "skipped": skipped,
    }


def _drop_failing_third_party(calls: dict[str, Callable[[], object]], skipped: dict[str, str]) -> None:
    """A third-party row that fails on this model / dtype is reported as not run, with its error,
    instead of failing the whole table (i2x's own rows are never dropped)."""
    for name in (CAPTUM, GRAD_CAM):
        if name in calls:
            try:
                calls[name]()
            except Exception as e:  # whatever the other library raises
                del calls[name]
                skipped[name] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _rows(times: dict[str, list[float]], peaks: dict[str, float | None]) -> list[dict]:
    """One dict per row; explain rows relative to the plain forward, training rows to the plain step."""
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    rows = []
    for name, t in times.items():
        baseline = TRAIN if name in (TRAIN, TRAIN_I2X) else FORWARD
        rows.append({
            "name": name,
            "group": "training" if baseline == TRAIN else "explain",
            "description": _DESCRIPTIONS[name],
            "baseline": baseline,
            "times_ms": [v * 1e3 for v in t],
            "median_ms": median[name],
            "min_ms": min(t) * 1e3,
            "ratio": median[name] / median[baseline],
            "peak_mib": peaks[name],
        })
    return rows


def format_table(result: dict) -> str:
    """The result as a heading, a machine line and a Markdown table."""
    m = result["machine"]
    lines = [
        f"i2x bench: {result['model']} ({result['model_source']}, {result['parameters'] / 1e6:.1f}M parameters), "
        f"input {'x'.join(str(v) for v in result['input'])}, {result['dtype']} on {result['device']}, "
        f"{result['method']} at {result['layer']} ({result['grid'][0]}x{result['grid'][1]}; {result['layer_source']})",
        f"machine: {m.get('gpu', m['cpu'])}, {m['cpu_count']} cores, {m['torch_threads']} torch threads, "
        f"torch {m['torch']}, i2x {m['i2x'].get('version')} (cuda {m['i2x'].get('cuda')}, "
        f"openmp {m['i2x'].get('openmp')})",
        f"median and min of {result['repeats']} interleaved rounds after {result['warmup']} warm-up; "
        f"peak memory: {result['memory']['method']}",
        "",
        "| row | what | median ms | min ms | ratio | peak MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['name']} | {r['description']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r['ratio']:.3f} x {r['baseline']} | {peak} |")
    for name, reason in result["skipped"].items():
        lines.append(f"| {name} | not run: {reason} | | | | |")
    return "\n".join(lines)
