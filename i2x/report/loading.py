"""What the report reads from a run, loaded once: the stored records of every stage, the dataset
behind the pictures, and one-line notes for what is missing."""

from __future__ import annotations

import contextlib
import html
import re
import shlex
from dataclasses import dataclass, field

import torch

from i2x._internal.hashing import tensor_digest
from i2x.analysis import load_analysis
from i2x.analysis.run_analysis import Analysis
from i2x.data import DATASET_INFO, ImageDataset, check_dataset_for_run, dataset_for_run
from i2x.loop.experiments import load_results
from i2x.loop.targets import NothingToCurate, Targets, load_targets
from i2x.report.numbers import image_size, run_probs
from i2x.store import RunStore, RunStoreError
from i2x.track.prototypes import Prototypes, read_prototypes

__all__ = ["LoadedRun", "load_run", "one_line"]

_MAX_NOTE = 300


def one_line(message, limit: int = _MAX_NOTE) -> str:
    """``message`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_run_dataset(store: RunStore, data_root) -> tuple[ImageDataset | None, str | None]:
    """``(dataset, None)``, or ``(None, why)`` as the one line the image panels show instead."""
    recorded = store.manifest["dataset"]
    name = recorded.get("name")
    if name not in DATASET_INFO:
        return None, (f"images not shown: the run's dataset {name!r} is not one i2x loads by name; "
                      "pass dataset= to write_report")
    try:
        data = dataset_for_run(store, name, root=data_root, train=recorded.get("split", "train") != "test",
                               size=image_size(store))
    except FileNotFoundError as e:
        return None, (f"images not shown: dataset {name!r} not found ({one_line(str(e).splitlines()[0])}); "
                      "pass --data-root")
    except ValueError as e:
        return None, f"images not shown: dataset {name!r} does not match the run: {one_line(e)}"
    return data, None


@dataclass
class LoadedRun:
    store: RunStore
    label: str                      # the run as the user named it, for the commands in notes
    experiment: str
    data: ImageDataset | None = None
    data_note: str | None = None
    steps: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None
    protos: Prototypes | None = None
    analysis: Analysis | None = None
    analysis_note: str | None = None
    targets: Targets | None = None
    targets_note: str | None = None
    results: dict | None = None
    test_evaluation: dict | None = None           # {"accuracy", "n"} of the final model on the test set
    labels: torch.Tensor | None = None            # the probe's true classes
    probe_indices: torch.Tensor | None = None     # the probe's positions in the dataset
    final_saliency: torch.Tensor | None = None    # [N, h, w] raw GradCAM at the last checkpoint
    notes: dict[str, list[str]] = field(default_factory=dict)
    section: str = "overview"                     # the section being built (where notes go)

    def note(self, text: str) -> str:
        """Record a one-line note of the current section and return it as HTML (commands in
        backticks become code; everything escaped)."""
        self.notes.setdefault(self.section, []).append(text)
        parts = html.escape(text, quote=True).split("`")
        body = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
        return f'<p class="note">{body}</p>'

    def command(self, text: str) -> str:
        """``text`` with the words RUN and DATA replaced by this run's folder and dataset name
        (shell-quoted), in one pass so neither can alter the other."""
        values = {"RUN": shlex.quote(self.label),
                  "DATA": shlex.quote(str(self.store.manifest["dataset"].get("name") or "NAME"))}
        return re.sub(r"\b(RUN|DATA)\b", lambda m: values[m.group(1)], text)


def _test_evaluation(store: RunStore, results: dict | None) -> dict | None:
    """The final model on the test set, where the run holds it: the demo's evaluation, else the
    experiment's starting model (None: no test-set number in the run)."""
    evaluation = (store.read_json("demo") or {}).get("evaluation") if store.has("demo") else None
    if evaluation is None and results is not None and results.get("start"):
        evaluation = {"accuracy": results["start"]["accuracy"], "n": results["config"].get("test_size")}
    if not evaluation or evaluation.get("n") is None:
        return None
    return {"accuracy": float(evaluation["accuracy"]), "n": int(evaluation["n"])}


def load_run(store: RunStore, label: str, dataset, data_root, experiment: str) -> LoadedRun:
    r = LoadedRun(store, label, experiment)
    r.probe_indices, r.labels = store.probe()
    if store.finished_steps():
        r.steps, r.probs = run_probs(store)
        r.final_saliency = store.load_checkpoint(r.steps[-1])["saliency"].float()
    if (store.path / "prototypes.safetensors").exists():
        r.protos = read_prototypes(store)
    if (store.path / "analysis.json").exists():
        try:
            r.analysis = load_analysis(store)
        except FileNotFoundError as e:  # the JSON without its tensors: a torn analysis
            raise RunStoreError(one_line(e, 600)) from None
        if r.protos is not None and tensor_digest(r.protos.assignment) != r.analysis.data["fingerprints"]["prototypes"]:
            r.analysis = None
            r.analysis_note = r.command("the prototypes changed after the analysis: re-run `i2x analyze RUN`")
    else:
        r.analysis_note = r.command("not run yet: run `i2x analyze RUN`")
    try:
        r.targets = load_targets(store)
    except FileNotFoundError:
        r.targets_note = r.command("not run yet: run `i2x curate RUN --data DATA`")
    except NothingToCurate as e:
        r.targets_note = f"nothing to curate: {one_line(e)}"
    with contextlib.suppress(FileNotFoundError):
        r.results = load_results(store, experiment)
    r.test_evaluation = _test_evaluation(store, r.results)
    if dataset is not None:
        check_dataset_for_run(store, dataset)
        r.data = dataset
    elif r.protos is not None or r.targets is not None:
        r.data, r.data_note = load_run_dataset(store, data_root)
    return r


