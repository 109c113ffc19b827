"""Explain image files with a model (``i2x explain --model WEIGHTS IMAGE|FOLDER ...``).

The model comes from an i2x run folder (rebuilt from its manifest's build spec, its
``weights.safetensors``, layer, classes, the dataset's image size, channels and normalisation, and
its prototypes) or from a weights file with an architecture: a torchvision name, ``module:factory``
or ``small-resnet`` (its widths, channels and classes read off the weights' shapes), optionally with
``run=`` for the prototypes, classes, layer and normalisation of a run.

For every image: the predicted class and the top-k probabilities, the raw GradCAM grid's peak, an
overlay ``OUT/<stem>.png`` at the image's own size, and, when prototypes are known, the structured
part: every prototype present in the image's layer features with its share of the saliency
(``ops.prototype_assign`` + ``ops.prototype_pool``, as the run's probe samples are explained), where
it occurs in the run's probe set, and from the run's analysis the classes it is shared or
specialised in, the pairs it is flagged for and its pooled beta for the predicted class.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from i2x import ops
from i2x._internal.checks import check_int, describe
from i2x._internal.hashing import tensor_digest
from i2x._internal.memory import check_memory_budget
from i2x._internal.modules import choose_layer, resolve_layer
from i2x._internal.weights import load_state_into, load_weights
from i2x.analysis import load_analysis
from i2x.analysis.readings import assignment_counts, class_presence
from i2x.data import DATASET_INFO
from i2x.explain import Explainer
from i2x.explain.batching import explain_batch_size
from i2x.models import build_arch, first_conv_channels
from i2x.reference import CAM_METHODS
from i2x.report import figures
from i2x.store import RunStore, atomic_write_bytes, open_run
from i2x.track import check_run_grid, final_model
from i2x.track.prototypes import Prototypes, layer_features_of, read_prototypes

__all__ = ["IMAGE_SUFFIXES", "ImageModel", "RunKnowledge", "explain_files", "explain_images", "image_files",
           "format_explanations", "load_image", "open_image_model", "overlay", "prototype_shares"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# torchvision's ImageNet weights expect these (used for a torchvision architecture without a run).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_OUT = "i2x-explain"
_OVERLAY_ALPHA = 0.5
_LIST_KEYS = 4  # how many mismatching weight names an error shows


# ----------------------------------------------------------------------------------------------
# What is known about the model


@dataclass
class RunKnowledge:
    """What a run adds to an explanation: its prototypes and what its analysis says about them.

    ``class_presence [M, K]``: share of the run's probe samples of each class in which each
    prototype occurs. ``shared`` / ``specialised``: prototype -> classes (from analysis.json);
    ``flagged``: prototype -> ``{pair, names, kind}`` of the confused pairs it is flagged for;
    ``beta``: the pooled regression's ``beta^t [T-1, K, M]`` (None without a current analysis).
    """

    path: str
    prototypes: Prototypes
    class_presence: torch.Tensor
    shared: dict[int, list[int]] = field(default_factory=dict)
    specialised: dict[int, list[int]] = field(default_factory=dict)
    flagged: dict[int, list[dict]] = field(default_factory=dict)
    beta: torch.Tensor | None = None
    analysis_note: str = ""


@dataclass
class ImageModel:
    """A model ready to explain image files: the module (eval mode), its layer, classes, input
    channels and size, the normalisation, where it came from, and the run's knowledge if any."""

    model: nn.Module
    layer: str
    classes: list[str]
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalization: str
    source: dict
    device: torch.device
    method: str = "gradcam"
    run: RunKnowledge | None = None

    def describe(self) -> dict:
        return {**self.source, "layer": self.layer, "method": self.method, "classes": len(self.classes),
                "channels": self.channels, "size": self.size, "device": str(self.device),
                "normalization": {"mean": list(self.mean), "std": list(self.std), "source": self.normalization},
                "prototypes": None if self.run is None else {"run": self.run.path,
                                                             "count": int(self.run.prototypes.n_prototypes),
                                                             "analysis": self.run.analysis_note or "used"}}


# ----------------------------------------------------------------------------------------------
# Weights and architectures


def _imagenet_categories(name: str, classes: int) -> list[str] | None:
    """ImageNet class names for a 1000-class torchvision model (in torchvision's weight metadata)."""
    if classes != 1000:
        return None
    try:
        import torchvision

        return list(torchvision.models.get_model_weights(name).DEFAULT.meta["categories"])
    except (ValueError, KeyError, AttributeError):
        return None


def _num_outputs(model: nn.Module, channels: int, size: int, device) -> int:
    with torch.no_grad():
        out = model(torch.zeros(1, channels, size, size, device=device))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"the model's output is {describe(out)}, not [B, classes] logits")
    return int(out.shape[1])


# ----------------------------------------------------------------------------------------------
# The run's side


def _run_dataset(store):
    return DATASET_INFO.get(store.manifest.get("dataset", {}).get("name"))


def run_knowledge(store) -> RunKnowledge | None:
    """The run's prototypes and what its analysis says about them (None without prototypes)."""
    if not store.has("prototypes") and not (store.path / "prototypes.safetensors").exists():
        return None
    protos = read_prototypes(store)
    assignment, k = protos.assignment, protos.n_prototypes
    presence = class_presence(assignment_counts(assignment, k), store.probe_labels(), store.num_classes)
    knowledge = RunKnowledge(str(store.path), protos, presence)
    if not (store.path / "analysis.json").exists():
        knowledge.analysis_note = "no analysis in the run (i2x analyze RUN adds shared/specialised classes)"
        return knowledge
    analysis = load_analysis(store)
    if analysis.data["fingerprints"]["prototypes"] != tensor_digest(assignment):
        knowledge.analysis_note = "the analysis predates the prototypes (re-run i2x analyze); not used"
        return knowledge
    _read_analysis(knowledge, analysis)
    return knowledge


def _read_analysis(knowledge: RunKnowledge, analysis) -> None:
    """Shared/specialised classes and flagged pairs per prototype (what explain_sample reads too)."""
    for entry in analysis.data["per_class"]:
        for kind, sink in (("shared", knowledge.shared), ("specialised", knowledge.specialised)):
            for p in entry[kind]:
                sink.setdefault(int(p["prototype"]), []).append(int(entry["class"]))
    for u in analysis.data["uncertainty"]:
        for kind, key in (("ambivalent", "flagged"), ("decisive", "decisive")):
            for p in u.get(key, []):
                knowledge.flagged.setdefault(int(p["prototype"]), []).append(
                    {"pair": list(u["pair"]), "names": list(u["names"]), "kind": kind})
    knowledge.beta = analysis.beta_pooled


# ----------------------------------------------------------------------------------------------
# Opening a model


def open_image_model(weights, *, arch: str | None = None, run=None, layer: str | None = None,
                     size: int | None = None, device=None, method: str = "gradcam") -> ImageModel:
    """The model to explain files with: ``weights`` is a run folder or a weights file (then
    ``arch`` is needed; ``run`` adds a run's prototypes, classes, layer and normalisation)."""
    weights = Path(weights)
    if method not in CAM_METHODS:
        raise ValueError(f"--method: expected one of {list(CAM_METHODS)}, got {method!r}")
    size = None if size is None else check_int(size, "--size")
    dev = torch.device(device or "cpu")
    store: RunStore | None
    if weights.is_dir():
        if arch is not None:
            raise ValueError(f"--arch: not used when --model is a run folder ({weights}); the run's manifest says "
                             "how to build its model")
        if run is not None:
            raise ValueError("--run: --model is already a run folder; give --run only with a weights file")
        store = open_run(weights)
        model = final_model(store)
        source = {"weights": str(weights / "weights.safetensors"), "arch": store.manifest["model"]["build"]["name"],
                  "kind": "run", "run": str(store.path)}
    elif weights.exists():
        if arch is None:
            raise ValueError(f"--arch is needed: --model {weights} is a weights file, not a run folder (give a "
                             "torchvision name, module:factory or small-resnet)")
        state = load_weights(weights)
        model, kind = build_arch(arch, state)
        load_state_into(model, state, weights, f"--arch {arch}")
        store = open_run(run) if run is not None else None
        source = {"weights": str(weights), "arch": arch, "kind": kind,
                  "run": None if store is None else str(store.path)}
    else:
        raise FileNotFoundError(f"--model {weights}: no such run folder or weights file")
    model = model.to(dev).eval()
    return _complete(model, source, store, layer, size, dev, method)


def _complete(model, source, store, layer, size, dev, method) -> ImageModel:
    """Layer, classes, channels, size and normalisation, from the run where there is one."""
    info = _run_dataset(store) if store is not None else None
    channels = first_conv_channels(model) or (info.channels if info else 3)
    if info is not None and info.channels != channels:
        raise ValueError(f"the model takes {channels}-channel images but the run's dataset {info.name!r} has "
                         f"{info.channels}")
    if size is None:
        if store is not None and info is None:
            raise ValueError(f"run {store.path}: its dataset {store.manifest['dataset'].get('name')!r} is not one i2x "
                             "knows, so the image size is unknown: pass --size")
        size = info.size if info else (28 if source["kind"] == "small-resnet" else 224)
    classes_n = _num_outputs(model, channels, size, dev)
    if store is not None:
        classes = list(store.classes)
        if len(classes) != classes_n:
            raise ValueError(f"the model has {classes_n} outputs but the run {store.path} has {len(classes)} classes")
    else:
        classes = (_imagenet_categories(source["arch"], classes_n) if source["kind"] == "torchvision" else None) \
            or [str(c) for c in range(classes_n)]
    if info is not None:
        mean, std, norm = info.mean, info.std, info.name
    elif source["kind"] == "torchvision" and channels == 3:
        mean, std, norm = IMAGENET_MEAN, IMAGENET_STD, "imagenet (torchvision)"
    else:
        mean, std, norm = (0.0,) * channels, (1.0,) * channels, "none (pixels in [0, 1])"
    layer_name = _pick_layer(model, layer, store, channels, size, dev)
    knowledge = run_knowledge(store) if store is not None else None
    im = ImageModel(model, layer_name, classes, channels, size, tuple(mean), tuple(std), norm, source, dev, method,
                    knowledge)
    if store is not None:
        check_run_grid(store, model, layer_name, torch.zeros(1, channels, size, size, device=dev),
                       "pass the --size the run's model was trained at")
    return im


def _pick_layer(model, layer, store, channels, size, dev) -> str:
    if layer is None and store is not None:
        layer = store.manifest["model"]["layer"]
    if layer is not None:
        return resolve_layer(model, layer)[0]
    return choose_layer(model, None, torch.zeros(1, channels, size, size, device=dev))[0]


# ----------------------------------------------------------------------------------------------
# Files and images


def image_files(inputs: Sequence) -> list[Path]:
    """Named files as given, folders as their image files (by suffix, sorted, not recursive)."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("IMAGE: give at least one image file or folder")
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"folder {item} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"image {item} does not exist")
    return files


def load_image(path: Path, channels: int, size: int, mean, std):
    """``(x [C, size, size] normalised, the image as RGB at its own size)``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
            model_view = img.convert("L" if channels == 1 else "RGB")
    except UnidentifiedImageError:
        raise ValueError(f"image {path}: not an image file PIL can read") from None
    except OSError as e:  # truncated or corrupt
        raise ValueError(f"image {path}: cannot be decoded ({e})") from None
    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels}-channel images; image files give 1 (L) or 3 (RGB)")
    if model_view.size != (size, size):
        model_view = model_view.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(model_view, dtype=np.float32) / 255.0
    x = torch.from_numpy(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy())
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s, rgb


def overlay(rgb, heat: torch.Tensor, alpha: float = _OVERLAY_ALPHA):
    """The image (PIL RGB) with ``heat [H, W]`` in [0, 1] (its size) blended over it in jet."""
    from PIL import Image

    return Image.fromarray(figures.overlay(np.asarray(rgb, dtype=np.uint8), heat.detach().cpu().float().numpy(), alpha))


# ----------------------------------------------------------------------------------------------
# Explaining


def prototype_shares(saliency: torch.Tensor, assignment: torch.Tensor, k: int):
    """``(share, counts, intensity)``, each ``[B, K]``: the mean saliency over each prototype's
    positions (``ops.prototype_pool``), their number, and the prototype's share of the image's
    total saliency (``intensity * counts / total``; 0 where the saliency is all zero)."""
    intensity, counts = ops.prototype_pool(saliency, assignment, k)
    mass = intensity.double() * counts.double()
    total = mass.sum(dim=1, keepdim=True)
    share = torch.where(total > 0, mass / total.clamp(min=1e-300), torch.zeros_like(mass))
    return share, counts, intensity


def _features(im: ImageModel, x: torch.Tensor) -> torch.Tensor:
    return layer_features_of(im.model, im.layer, x)


def _prototype_entries(im: ImageModel, share, counts, intensity, predicted: int) -> list[dict]:
    """One entry per prototype present, by share, descending."""
    run, names = im.run, im.classes
    assert run is not None  # the structured part is computed only for a model with a run's prototypes
    present = [int(k) for k in counts.nonzero().flatten()]
    present.sort(key=lambda k: (-float(share[k]), k))
    out = []
    for k in present:
        order = torch.argsort(run.class_presence[:, k], descending=True, stable=True)[:3]
        entry = {"prototype": k, "share": float(share[k]), "positions": int(counts[k]),
                 "mean_saliency": float(intensity[k]),
                 "probe_presence": [{"class": int(c), "name": names[c], "presence": float(run.class_presence[c, k])}
                                    for c in order.tolist()]}
        if run.beta is not None:
            entry["shared_in"] = [names[c] for c in run.shared.get(k, [])]
            entry["specialised_in"] = [names[c] for c in run.specialised.get(k, [])]
            entry["flagged_for"] = run.flagged.get(k, [])
            entry["beta_predicted_now"] = float(run.beta[-1, k, predicted])
        out.append(entry)
    return out


def _overlay_names(files: list[Path]) -> list[str]:
    """``<stem>.png`` per file; a repeated stem gets ``_2``, ``_3`` ... so nothing is overwritten."""
    used, names = set(), []
    for f in files:
        name, i = f.stem, 1
        while name in used:
            i += 1
            name = f"{f.stem}_{i}"
        used.add(name)
        names.append(f"{name}.png")
    return names


def explain_images(im: ImageModel, files: list[Path], out: Path | None, top: int = 5, *,
                   batch_size: int | None = None, memory_budget: float | None = None) -> list[dict]:
    """One explanation dict per file (overlays written to ``out`` when given), ``batch_size``
    files per forward (None: as many as ``memory_budget`` MiB hold, at most 256)."""
    top = check_int(top, "--top")
    explainer = Explainer(im.model, im.layer, im.method)
    if batch_size is None:
        batch = explain_batch_size(explainer, torch.zeros(im.channels, im.size, im.size), memory_budget,
                                   in_flight=0, device=im.device)
    else:
        batch = check_int(batch_size, "--batch-size")
    names = _overlay_names(files)
    results = []
    for start in range(0, len(files), batch):
        chunk = files[start:start + batch]
        loaded = [load_image(f, im.channels, im.size, im.mean, im.std) for f in chunk]
        x = torch.stack([t for t, _ in loaded]).to(im.device)
        grid, logits = explainer.explain(x, size=None, normalize=False, return_logits=True)
        probs = torch.softmax(logits.float(), dim=1).cpu()
        grid = grid.float()
        structured = None
        if im.run is not None:
            assignment = im.run.prototypes.assign(_features(im, x))
            structured = prototype_shares(grid, assignment, im.run.prototypes.n_prototypes)
        for i, (path, (_, rgb)) in enumerate(zip(chunk, loaded, strict=True)):
            mine = None if structured is None else tuple(t[i].cpu() for t in structured)
            entry = _one(im, path, rgb, grid[i], probs[i], top, mine)
            if out is not None:
                target = out / names[start + i]
                heat = ops.upsample_normalize(grid[i:i + 1], (rgb.size[1], rgb.size[0]))[0]
                overlay(rgb, heat).save(target)
                entry["overlay"] = str(target)
            results.append(entry)
    return results


def _one(im: ImageModel, path: Path, rgb, grid, probs, top: int, structured: Sequence[torch.Tensor] | None) -> dict:
    h, w = grid.shape
    flat = int(torch.argmax(grid.flatten()))  # first maximum, row-major
    row, col = divmod(flat, w)
    width, height = rgb.size
    best = torch.topk(probs, min(top, probs.numel()))
    predicted = int(best.indices[0])
    entry = {
        "file": str(path),
        "image_size": [height, width],
        "predicted": {"class": predicted, "name": im.classes[predicted], "prob": float(probs[predicted])},
        "top": [{"class": int(c), "name": im.classes[int(c)], "prob": float(p)}
                for p, c in zip(best.values, best.indices, strict=True)],
        "grid": [int(h), int(w)],
        # The cell's centre in the image's own pixels (x to the right, y down).
        "peak": {"row": row, "col": col, "saliency": float(grid[row, col]),
                 "x": (col + 0.5) * width / w, "y": (row + 0.5) * height / h},
    }
    if structured is not None:
        share, counts, intensity = structured
        entry["prototypes"] = _prototype_entries(im, share, counts, intensity, predicted)
    return entry


def explain_files(weights, inputs, *, arch: str | None = None, run=None, layer: str | None = None,
                  out=DEFAULT_OUT, top: int = 5, size: int | None = None, device=None,
                  method: str = "gradcam", batch_size: int | None = None, memory_budget: float | None = None) -> dict:
    """Explain image files (or folders of them) with a model; writes ``OUT/<stem>.png`` overlays
    and ``OUT/explanations.json`` (``out=None``: nothing written). Returns that JSON's dict:
    ``{"model": ..., "out": ..., "images": [...]}``. ``batch_size``: files per forward; None: as
    many as ``memory_budget`` MiB hold (default 256 MiB, docs/memory.md)."""
    top = check_int(top, "--top")
    if batch_size is not None:
        check_int(batch_size, "--batch-size")
    check_memory_budget(memory_budget, "--memory-budget")
    files = image_files(inputs)
    im = open_image_model(weights, arch=arch, run=run, layer=layer, size=size, device=device, method=method)
    folder = None if out is None else Path(out)
    created = folder is not None and not folder.exists()
    if folder is not None:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"--out {folder} exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
    try:
        result = {"model": im.describe(), "out": None if folder is None else str(folder),
                  "images": explain_images(im, files, folder, top, batch_size=batch_size,
                                                 memory_budget=memory_budget)}
        if folder is not None:
            atomic_write_bytes(folder / "explanations.json", (json.dumps(result, indent=2) + "\n").encode())
    except BaseException:
        if created and folder is not None:  # a call that fails (an unreadable image, say) leaves no folder behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return result


def format_explanations(result: dict, top: int = 5) -> str:
    """The explanations as text: one paragraph per image."""
    lines = []
    for e in result["images"]:
        p = e["peak"]
        others = ", ".join(f"{t['name']!r} {t['prob']:.3f}" for t in e["top"])
        lines.append(f"{e['file']}: predicted {e['predicted']['name']!r} (p={e['predicted']['prob']:.3f}); "
                     f"top {others}")
        lines.append(f"  saliency peak at ({p['row']}, {p['col']}) of the {e['grid'][0]}x{e['grid'][1]} grid "
                     f"(pixel x={p['x']:.0f}, y={p['y']:.0f})"
                     + (f"; overlay {e['overlay']}" if "overlay" in e else ""))
        for q in e.get("prototypes", [])[:top]:
            where = ", ".join(f"{c['name']} {c['presence']:.0%}" for c in q["probe_presence"])
            extra = ""
            if "shared_in" in q:
                parts = [f"shared in {', '.join(q['shared_in'])}" if q["shared_in"] else "",
                         f"specialised in {', '.join(q['specialised_in'])}" if q["specialised_in"] else "",
                         "flagged for " + ", ".join(f"{a}-{b} ({f['kind']})" for f in q["flagged_for"]
                                                    for a, b in [f["names"]]) if q["flagged_for"] else "",
                         f"beta[{e['predicted']['name']}] {q['beta_predicted_now']:+.3g}"]
                extra = "; " + "; ".join(s for s in parts if s)
            lines.append(f"  prototype {q['prototype']}: {q['share']:.1%} of the saliency "
                         f"({q['positions']} positions); in the probe: {where}{extra}")
    if result.get("out"):
        lines.append(f"written: {Path(result['out']) / 'explanations.json'}")
    return "\n".join(lines)
