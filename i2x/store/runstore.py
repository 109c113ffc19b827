"""The run on disk: one folder per run, every file written atomically, nothing unpickled.

Layout (``docs/run-format.md`` describes every field)::

    run_dir/
      manifest.json                       format + version, model/layer, dataset/probe, classes,
                                          schedule, options, finished checkpoints, stage records
      probe.safetensors                   indices [N] int64 (into the dataset), labels [N] int64
      checkpoints/step-000000123.safetensors   saliency [N, h, w] float16 (raw GradCAM grid of
                                          the true class), probs [N, M] float32 (softmax)
      prototypes.safetensors              written by i2x.prototypes (options in the manifest)
      analysis.json, analysis.safetensors written by i2x.analysis

A checkpoint counts as finished only once its file is in place *and* the manifest lists it: the
file is written first (temporary file, fsync, ``os.replace``), then the manifest. A run killed at
any point therefore leaves either a finished checkpoint or one that is simply redone on resume.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from i2x._internal.checks import describe
from i2x._internal.hashing import bytes_digest, file_digest, tensor_bytes
from i2x.store import lock
from i2x.store.atomic import (
    TMP_PREFIX,
    atomic_save_tensors,
    atomic_write_json,
)
from i2x.store.lock import RunLockedError

__all__ = ["RunStore", "RunStoreError", "RunLockedError", "FORMAT", "FORMAT_VERSION", "open_run", "read_json_file",
           "read_record"]

FORMAT = "i2x-run"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROBE = "probe.safetensors"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# Fields that define *which* run a folder holds: resuming with any of them changed is refused.
IDENTITY_FIELDS = ("model", "dataset", "classes", "probe")


class RunStoreError(ValueError):
    """A run folder that is missing, corrupt, foreign, or holds a different run."""


# ----------------------------------------------------------------------------------------------
# The store


def _checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_DIR}/step-{step:09d}.safetensors"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunStore:
    """One run folder: read and write the records of a tracked run.

    Create a new run (or reopen the same run to resume) with :meth:`create`; open an existing one
    with :meth:`open`. Every write is atomic and updates ``manifest.json`` last.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self._manifest = manifest
        self._lock_key: str | None = None
        self._lock_finalizer: weakref.finalize | None = None
        self._verified: set[Path] = set()  # files whose hash this store checked already

    # -- one writer at a time (i2x.store.lock) -----------------------------------------------

    def lock_for_writing(self) -> RunStore:
        """Become the run's writer (every write method calls this first): an OS file lock held
        until :meth:`release` or until this store is garbage-collected or the process ends.
        Raises :class:`RunLockedError` when another process is writing the run."""
        if self._lock_key is None:
            self._lock_key = lock.acquire(self.path)
            self._lock_finalizer = weakref.finalize(self, lock.release, self._lock_key)
        return self

    def release(self) -> None:
        """Stop being the run's writer (another process may write it from now on)."""
        if self._lock_finalizer is not None:
            self._lock_finalizer()  # runs lock.release once
        self._lock_key = self._lock_finalizer = None

    # -- opening and creating ---------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunStore:
        """Open an existing run folder, checking that it is one and that this i2x can read it."""
        path = Path(path)
        if not path.exists():
            raise RunStoreError(f"run folder {path} does not exist")
        if not path.is_dir():
            raise RunStoreError(f"run folder {path} is not a folder")
        manifest = _read_manifest(path)
        store = cls(path, manifest)
        store._check_probe_file()
        return store

    @classmethod
    def create(
        cls,
        path: Path | str,
        *,
        model: Mapping,
        dataset: Mapping,
        classes: Iterable[str],
        probe_indices: torch.Tensor,
        probe_labels: torch.Tensor,
        schedule: Mapping | None = None,
        options: Mapping | None = None,
    ) -> RunStore:
        """A new run in ``path``, or the same run reopened for resuming.

        When ``path`` already holds a run, its model, dataset, classes and probe set must equal
        the ones given (otherwise :class:`RunStoreError` names the field that differs); its
        finished checkpoints are kept. An existing folder with other content is refused.
        """
        path = Path(path)
        indices, labels = _check_probe(probe_indices, probe_labels)
        classes = [str(c) for c in classes]
        if not classes:
            raise ValueError("classes: expected at least one class name, got none")
        if int(labels.max()) >= len(classes) or int(labels.min()) < 0:
            raise ValueError(
                f"probe_labels: expected values in [0, {len(classes) - 1}] for {len(classes)} classes, "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )
        identity = {
            "model": dict(model),
            "dataset": dict(dataset),
            "classes": classes,
            "probe": {"size": int(indices.numel()), "fingerprint": _fingerprint(indices, labels)},
        }
        _json_safe(identity, "run description")
        if (path / MANIFEST).exists():
            store = cls.open(path)
            for name in IDENTITY_FIELDS:
                if store._manifest.get(name) != identity[name]:
                    raise RunStoreError(
                        f"run folder {path} holds a different run: its {name!r} is "
                        f"{store._manifest.get(name)!r}, this run's is {identity[name]!r}. "
                        "Use another folder, or delete this one to start over."
                    )
            store.lock_for_writing()  # before removing temporaries: they may be a live writer's
            store._cleanup_temporaries()
            return store
        if path.exists() and any(path.iterdir()):
            raise RunStoreError(
                f"{path} exists and is not empty but has no {MANIFEST}: refusing to write a run into a "
                "folder that holds something else"
            )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _now(),
            **identity,
            "schedule": dict(schedule or {}),
            "options": dict(options or {}),
            "grid": None,
            "checkpoints": [],
            "stages": {},
        }
        _json_safe(manifest, "manifest")
        path.mkdir(parents=True, exist_ok=True)
        store = cls(path, manifest).lock_for_writing()
        atomic_save_tensors(path / PROBE, {"indices": indices, "labels": labels})
        store._write_manifest()
        return store

    # -- what the run is --------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        """A copy of the manifest (edit through the store's methods, not this dict)."""
        return json.loads(json.dumps(self._manifest))

    @property
    def classes(self) -> list[str]:
        return list(self._manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self._manifest["classes"])

    @property
    def probe_size(self) -> int:
        return int(self._manifest["probe"]["size"])

    @property
    def grid(self) -> tuple[int, int] | None:
        g = self._manifest.get("grid")
        return None if g is None else (int(g[0]), int(g[1]))

    def probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [N], labels [N])`` of the probe set (int64)."""
        tensors = self._load(self.path / PROBE, ("indices", "labels"))
        return tensors["indices"], tensors["labels"]

    def probe_labels(self) -> torch.Tensor:
        return self.probe()[1]

    # -- checkpoints ------------------------------------------------------------------------

    def finished_steps(self) -> list[int]:
        """Steps of the finished checkpoints, ascending."""
        return sorted(int(c["step"]) for c in self._manifest["checkpoints"])

    def has_checkpoint(self, step: int) -> bool:
        return any(int(c["step"]) == int(step) for c in self._manifest["checkpoints"])

    def final_step(self) -> int | None:
        """The step of the checkpoint recorded as the final model (None if not recorded yet)."""
        finals = [int(c["step"]) for c in self._manifest["checkpoints"] if c.get("final")]
        return max(finals) if finals else None

    def write_checkpoint(self, step: int, saliency: torch.Tensor, probs: torch.Tensor, final: bool = False,
                         extra: Mapping | None = None) -> None:
        """Record one checkpoint: ``saliency [N, h, w]`` (stored float16) and ``probs [N, M]``.

        Writing a step that is already finished replaces it.
        """
        step = _check_step(step)
        n, m = self.probe_size, self.num_classes
        if not isinstance(saliency, torch.Tensor) or saliency.dim() != 3 or saliency.shape[0] != n:
            raise ValueError(f"saliency: expected a [{n}, h, w] tensor, got {describe(saliency)}")
        if not isinstance(probs, torch.Tensor) or tuple(probs.shape) != (n, m):
            raise ValueError(f"probs: expected a [{n}, {m}] tensor, got {describe(probs)}")
        if not saliency.is_floating_point() or not probs.is_floating_point():
            raise TypeError("saliency and probs must be floating-point tensors")
        if not bool(torch.isfinite(saliency).all()) or not bool(torch.isfinite(probs).all()):
            raise ValueError(f"checkpoint at step {step}: saliency or probs hold NaN/inf; refusing to record them")
        grid = [int(saliency.shape[1]), int(saliency.shape[2])]
        if self._manifest.get("grid") not in (None, grid):
            raise ValueError(f"saliency: expected the run's grid {self._manifest['grid']}, got {grid}")
        # float16 tops out at 65504; raw GradCAM values of a sane model sit far below, but clamp
        # rather than store inf.
        sal16 = saliency.detach().float().clamp(max=65504.0).to(torch.float16)
        rel = _checkpoint_name(step)
        self.lock_for_writing()
        atomic_save_tensors(self.path / rel, {"saliency": sal16, "probs": probs.detach().float()})
        self._verified.discard((self.path / rel).resolve())
        entry = {"step": step, "file": rel, "final": bool(final), "written": _now(),
                 "sha256": file_digest(self.path / rel), **dict(extra or {})}
        _json_safe(entry, "checkpoint entry")

        def add(manifest):
            manifest["grid"] = grid
            manifest["checkpoints"] = [c for c in manifest["checkpoints"] if int(c["step"]) != step] + [entry]
            manifest["checkpoints"].sort(key=lambda c: int(c["step"]))

        self._update_manifest(add)

    def mark_final(self, step: int) -> None:
        """Mark the finished checkpoint ``step`` as the final model's, without writing it again."""
        step = _check_step(step)
        if step not in self.finished_steps():
            raise KeyError(f"run {self.path} has no finished checkpoint at step {step}; "
                           f"finished: {self.finished_steps()}")

        def mark(manifest):
            for entry in manifest["checkpoints"]:
                if int(entry["step"]) == step:
                    entry["final"] = True

        self._update_manifest(mark)

    def load_checkpoint(self, step: int) -> dict[str, torch.Tensor]:
        """``{"saliency": [N, h, w] float16, "probs": [N, M] float32}`` of a finished step."""
        step = int(step)
        entry = next((c for c in self._manifest["checkpoints"] if int(c["step"]) == step), None)
        if entry is None:
            raise KeyError(f"run {self.path} has no finished checkpoint at step {step}; "
                           f"finished: {self.finished_steps()}")
        tensors = self._load(self.path / entry["file"], ("saliency", "probs"), entry.get("sha256"))
        n, m = self.probe_size, self.num_classes
        sal, probs = tensors["saliency"], tensors["probs"]
        if sal.dim() != 3 or sal.shape[0] != n or list(sal.shape[1:]) != self._manifest["grid"]:
            raise RunStoreError(f"{entry['file']} in {self.path}: saliency has shape {list(sal.shape)}, "
                                f"expected [{n}, *{self._manifest['grid']}]")
        if tuple(probs.shape) != (n, m):
            raise RunStoreError(f"{entry['file']} in {self.path}: probs has shape {list(probs.shape)}, "
                                f"expected [{n}, {m}]")
        return tensors

    def load_all(self, steps: Iterable[int] | None = None) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """``(steps, saliency [T, N, h, w] float32, probs [T, N, M] float32)`` of the finished steps."""
        steps = self.finished_steps() if steps is None else [int(s) for s in steps]
        if not steps:
            raise RunStoreError(f"run {self.path} has no finished checkpoints yet")
        records = [self.load_checkpoint(s) for s in steps]
        saliency = torch.stack([r["saliency"].float() for r in records])
        probs = torch.stack([r["probs"] for r in records])
        return steps, saliency, probs

    # -- artefacts of later stages (prototypes, analysis) ------------------------------------

    def write_tensors(self, name: str, tensors: Mapping[str, torch.Tensor], record: Mapping | None = None) -> None:
        """Write ``name.safetensors`` and note the stage (with ``record``, JSON) in the manifest."""
        name = _check_name(name)
        self.lock_for_writing()
        atomic_save_tensors(self.path / f"{name}.safetensors", tensors)
        self._verified.discard((self.path / f"{name}.safetensors").resolve())
        self.record_stage(name, {**dict(record or {}), "sha256": file_digest(self.path / f"{name}.safetensors")})

    def write_weights(self, state_dict: Mapping[str, torch.Tensor], step: int | None = None) -> None:
        """Keep the final model's weights in the run (``weights.safetensors``, atomic)."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise ValueError("write_weights: the state dict holds no tensors")
        self.write_tensors("weights", tensors, record={"step": step, "n_tensors": len(tensors)})

    def read_weights(self) -> dict[str, torch.Tensor]:
        """The weights kept by :meth:`write_weights` (FileNotFoundError when the run keeps none)."""
        if not (self.path / "weights.safetensors").exists():
            raise FileNotFoundError(f"run {self.path} keeps no final weights (weights.safetensors): pass the weights "
                                    "file, or finish the tracker with save_weights=True")
        return self.read_tensors("weights")

    def read_tensors(self, name: str, required: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        name = _check_name(name)
        digest = (self._manifest.get("stages", {}).get(name) or {}).get("sha256")
        return self._load(self.path / f"{name}.safetensors", tuple(required), digest)

    def write_json(self, name: str, obj, record: Mapping | None = None) -> None:
        """Write ``name.json`` atomically (NaN/inf are refused: JSON has no such numbers)."""
        name = _check_name(name)
        _json_safe(obj, f"{name}.json")
        self.lock_for_writing()
        atomic_write_json(self.path / f"{name}.json", obj)
        self.record_stage(name, record)

    def read_json(self, name: str):
        name = _check_name(name)
        path = self.path / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"run {self.path} has no {name}.json (has that stage run?)")
        return read_json_file(path)

    def stage(self, name: str) -> dict | None:
        """The manifest's record of a later stage (None if it has not run)."""
        rec = self._manifest.get("stages", {}).get(name)
        return None if rec is None else json.loads(json.dumps(rec))

    def has(self, name: str) -> bool:
        return name in self._manifest.get("stages", {})

    def update_schedule(self, schedule: Mapping) -> None:
        schedule = dict(schedule)
        _json_safe(schedule, "schedule")
        self._update_manifest(lambda manifest: manifest.__setitem__("schedule", schedule))

    # -- internals --------------------------------------------------------------------------

    def record_stage(self, name: str, record: Mapping | None) -> None:
        """Note in the manifest that stage ``name`` wrote its files (``record``: what to say of it)."""
        rec = {"written": _now(), **dict(record or {})}
        _json_safe(rec, f"record of {name}")
        self._update_manifest(lambda manifest: manifest.setdefault("stages", {}).__setitem__(name, rec))

    def refresh(self) -> RunStore:
        """Read the manifest again (another store object, or another process, may have written
        stages since this one was opened)."""
        self._manifest = _read_manifest(self.path)
        return self

    def _update_manifest(self, change) -> None:
        """Read-modify-write of the manifest under the writer's lock: re-read first, so that two
        store objects of one process (say a Tracker's and the analysis') never drop each other's
        records."""
        self.lock_for_writing()
        if (self.path / MANIFEST).exists():
            self.refresh()
        change(self._manifest)
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.lock_for_writing()
        atomic_write_json(self.path / MANIFEST, self._manifest)

    def _inside(self, path: Path) -> Path:
        """``path``, after checking that it (symbolic links followed) stays inside the run folder."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.path.resolve()):
            raise RunStoreError(f"corrupt run {self.path}: {path.name} leads outside the run folder (to {resolved}); "
                                "a run only reads its own files")
        return resolved

    def _verify(self, path: Path, digest: str | None) -> None:
        """The file's sha256 against the one recorded when it was written (runs written before
        i2x recorded them have none); each file once per opened store."""
        if digest is None or path in self._verified:
            return
        actual = file_digest(path)
        if actual != digest:
            raise RunStoreError(f"corrupt run {self.path}: {path.name} changed after it was written (sha256 {actual}, "
                                f"the manifest recorded {digest}); re-run the stage that writes it")
        self._verified.add(path)

    def verify(self) -> RunStore:
        """Check every file the manifest lists: present, inside the run folder, and (where recorded)
        with the hash it was written with. Raises RunStoreError naming the first that is not."""
        listed = [(self.path / c["file"], c.get("sha256")) for c in self._manifest["checkpoints"]]
        for name, record in self._manifest.get("stages", {}).items():
            if isinstance(record, dict) and "sha256" in record:
                listed.append((self.path / f"{name}.safetensors", record["sha256"]))
        for path, digest in listed:
            if not path.exists():
                raise RunStoreError(f"corrupt run {self.path}: {path.relative_to(self.path)} is missing although the "
                                    "manifest lists it")
            self._verify(self._inside(path), digest)
        return self

    def _load(self, path: Path, required: tuple[str, ...], digest: str | None = None) -> dict[str, torch.Tensor]:
        if not path.exists():
            raise RunStoreError(
                f"{path} is missing from run {self.path} although the manifest lists it: the folder was "
                "changed by hand or copied incompletely; re-run the stage that writes it"
            )
        path = self._inside(path)
        self._verify(path, digest)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise RunStoreError(f"{path} is not a readable safetensors file ({e}); the run folder is corrupt") from None
        missing = [k for k in required if k not in tensors]
        if missing:
            raise RunStoreError(f"{path} lacks the tensors {missing}; it holds {sorted(tensors)}")
        return tensors

    def _check_probe_file(self) -> None:
        indices, labels = self.probe()
        if indices.numel() != self.probe_size or labels.numel() != self.probe_size:
            raise RunStoreError(f"{self.path / PROBE}: holds {indices.numel()} samples, "
                                f"the manifest says {self.probe_size}")
        if _fingerprint(indices, labels) != self._manifest["probe"]["fingerprint"]:
            raise RunStoreError(f"{self.path / PROBE} does not match the manifest's probe fingerprint: "
                                "the folder is corrupt")

    def _cleanup_temporaries(self) -> None:
        # Left by a run killed mid-write; never referenced by the manifest.
        for folder in (self.path, self.path / CHECKPOINT_DIR):
            if folder.is_dir():
                for tmp in folder.glob(TMP_PREFIX + "*"):
                    tmp.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r}, checkpoints={self.finished_steps()})"


# ----------------------------------------------------------------------------------------------
# Validation helpers


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.exists():
        raise RunStoreError(f"{path} is not an i2x run folder: it has no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunStoreError(f"{mpath} is not valid JSON ({e}): the run folder is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RunStoreError(f"{mpath} is not an i2x run manifest (its 'format' is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise RunStoreError(
            f"{mpath} has format version {version!r}; this i2x reads version {FORMAT_VERSION}. "
            "Use the i2x release that wrote it, or re-track the run."
        )
    for key, kind in (("classes", list), ("checkpoints", list), ("probe", dict), ("model", dict), ("dataset", dict)):
        if not isinstance(manifest.get(key), kind):
            raise RunStoreError(f"{mpath} is corrupt: field {key!r} is missing or not a {kind.__name__}")
    previous = -1
    for entry in manifest["checkpoints"]:
        if (not isinstance(entry, dict) or not isinstance(entry.get("step"), int)
                or not isinstance(entry.get("file"), str)):
            raise RunStoreError(f"{mpath} is corrupt: checkpoint entry {entry!r} lacks an integer 'step' or a 'file'")
        # i2x names every checkpoint file after its step, inside the run: anything else (an absolute
        # path, '..', a step edited by hand) is a manifest that i2x did not write.
        if entry["step"] < 0 or entry["file"] != _checkpoint_name(entry["step"]):
            raise RunStoreError(f"{mpath} is corrupt: the checkpoint of step {entry['step']} names the file "
                                f"{entry['file']!r}, not {_checkpoint_name(max(entry['step'], 0))!r} "
                                "(the manifest was edited by hand?)")
        if entry["step"] <= previous:
            raise RunStoreError(f"{mpath} is corrupt: checkpoint steps are not strictly increasing "
                                f"({previous} then {entry['step']})")
        previous = entry["step"]
    return manifest


def _check_probe(indices, labels) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("probe_indices", indices), ("probe_labels", labels)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name}: expected a 1-D integer tensor, got {describe(t)}")
    if indices.numel() == 0:
        raise ValueError("probe_indices: the probe set is empty")
    if indices.shape != labels.shape:
        raise ValueError(f"probe_indices and probe_labels differ in length: {indices.numel()} vs {labels.numel()}")
    return indices.long().cpu().contiguous(), labels.long().cpu().contiguous()


def _fingerprint(indices: torch.Tensor, labels: torch.Tensor) -> str:
    # The probe's identity: its indices then its labels (int64 bytes), as every run records it.
    return bytes_digest(tensor_bytes(indices), tensor_bytes(labels))


def _check_step(step) -> int:
    if isinstance(step, bool) or (
            not isinstance(step, int) and not (isinstance(step, torch.Tensor) and step.numel() == 1)):
        raise TypeError(f"step: expected an int, got {type(step).__name__}")
    step = int(step)
    if step < 0:
        raise ValueError(f"step: expected a non-negative int, got {step}")
    return step


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in {"manifest", "probe"}:
        raise ValueError(f"artefact name {name!r}: expected letters, digits, '_', '-', '.', not manifest/probe")
    return name


def _json_safe(obj, what: str) -> None:
    try:
        json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{what} must be plain JSON (str, int, float, bool, None, lists, dicts; no NaN): {e}"
        ) from None


def open_run(run) -> RunStore:
    """``run`` itself when it is a :class:`RunStore`, else the existing run folder at that path
    (:meth:`RunStore.open`): how every entry point that takes ``run`` reads it."""
    if isinstance(run, RunStore):
        return run
    if isinstance(run, (str, os.PathLike)):
        return RunStore.open(run)
    raise TypeError(f"run: expected a run folder path or a RunStore, got {describe(run)}")


def read_json_file(path: Path) -> object:
    """The JSON document at ``path``, or RunStoreError naming the file when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunStoreError(f"{path} is not valid JSON ({e}); the run folder is corrupt, re-run that stage") from None


def read_record(
    path: Path, schema: str, what: str, version: int | None = None, redo: str = "re-run that stage"
) -> dict:
    """A stage's JSON record at ``path``: a JSON object whose ``schema`` is ``schema`` (and whose
    ``schema_version`` is ``version``, when given), or RunStoreError naming the file and ``redo``."""
    data = read_json_file(path)
    if not isinstance(data, dict) or data.get("schema") != schema:
        raise RunStoreError(f"{path} is not {what} (schema is not {schema!r})")
    if version is not None and data.get("schema_version") != version:
        raise RunStoreError(f"{path} has schema version {data.get('schema_version')!r}; this i2x reads {version}. "
                            f"{redo[:1].upper()}{redo[1:]}.")
    return data
