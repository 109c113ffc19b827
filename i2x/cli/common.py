"""What the subcommands share: the common options (``--quiet``, ``--json``, ``--debug``), argument
types, and opening a run's model and data for the commands that rebuild them.

Only the standard library is imported at module level: ``i2x --help`` must answer without torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import warnings
from pathlib import Path

# The names --data takes (i2x.data.DATASET_INFO, written out: the command imports no torch at
# --help). The decoy-* sets are their base set with Decoy-MNIST's class-coloured corner square on
# every training image and a random class's square on every test image (docs/tracking.md).
DATA_NAMES = "fashion-mnist, mnist, cifar10, digits, decoy-fashion-mnist or decoy-mnist"
DATA_HELP = (f"{DATA_NAMES} (decoy-*: the base set with a class-coloured 4x4 corner square on each training image "
             "and a random class's square at test, decoy seed 0)")

# Every subcommand takes these (argparse ``parents=[COMMON]``).
COMMON = argparse.ArgumentParser(add_help=False)
_common = COMMON.add_argument_group("output")
_common.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
_common.add_argument("--json", action="store_true", help="print one JSON document on stdout (implies --quiet)")
_common.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")


def add_memory_budget(parser: argparse.ArgumentParser) -> None:
    """``--memory-budget MIB``: what sizes every explain / evaluation batch the user does not set."""
    parser.add_argument("--memory-budget", type=positive_float, default=None, metavar="MIB",
                        help="MiB one explain or evaluation batch may use: the batch sizes follow from it and the "
                             "image and model size (default 256; docs/memory.md)")


def emit(args, data, text) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text`` (a string, or a callable giving one)."""
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(text() if callable(text) else text)


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "a non-negative integer")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A number, refused at parse time when it is NaN or infinite (JSON records cannot hold them)."""
    return _finite_float(text)


def positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


# torch's device strings, checked without importing torch (``i2x --help`` and bad options stay torch-free).
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps|xpu(:\d+)?)$")


def device_name(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``xpu[:N]``; anything else is refused at parse time."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N, mps or xpu[:N], got {text!r}")
    return text


def plain_name(text: str) -> str:
    """A folder name inside the run: letters, digits, '_' and '-' only (no path, no '..')."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise argparse.ArgumentTypeError(f"expected a plain name (letters, digits, '_', '-'), got {text!r}")
    return text


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def add_model_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="the run folder (made by i2x track or i2x.Tracker)")
    p.add_argument("--data", required=True, help=f"the run's dataset by name: {DATA_HELP}")
    p.add_argument("--data-root", type=Path, default=None, help="dataset folder in torchvision's layout")
    p.add_argument("--size", type=positive_int, default=None,
                   help="resize the images to SIZE px, as the run's model was trained (default: the dataset's size)")
    p.add_argument("--weights", type=Path, default=None,
                   help="the final weights (safetensors or a torch file; default: the run's weights.safetensors)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")


def open_run(path: Path):
    from i2x.store import RunStore

    return RunStore.open(path)


def run_model(store, weights: Path | None, device):
    """The run's final model (:func:`i2x.track.final_model`) on ``device``."""
    from i2x.track import final_model

    model = final_model(store, weights)
    return model if device is None else model.to(device)


def run_data(store, args, train: bool = True):
    """The run's dataset (one split) from ``--data``, ``--data-root`` and ``--size``, checked
    against the run (:func:`i2x.data.dataset_for_run`)."""
    from i2x.data import dataset_for_run

    return dataset_for_run(store, args.data, root=args.data_root, train=train, size=args.size)


def check_grid(model, store, data, device) -> None:
    """The model's target layer on one image must give the run's grid (else: another image size)."""
    from i2x.track import check_run_grid

    layer = store.manifest["model"]["layer"]
    try:
        model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"the rebuilt model has no layer {layer!r} (the run's target layer)") from None
    check_run_grid(store, model, layer, data.images[:1].to(device or "cpu"),
                   "load the images at the size the run was trained on (--size)")


def class_index(store, token: str) -> int:
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


def class_label(names: list[str], c: int) -> str:
    return names[c] if names[c] == str(c) else f"{c} ({names[c]})"


@contextlib.contextmanager
def warnings_as_lines(verb: str):
    """Warnings the work raises (e.g. an overlapping pair: i2x.analysis.labels.LabelOverlapWarning)
    printed at once as the command's own lines, not as Python's ``file:line: Category``."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"i2x {verb}: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield
