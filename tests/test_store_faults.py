"""A failed write (a full disk, simulated) leaves the run as it was before that write, and the error
names the file that could not be written.

Truth: the run folder's bytes before the failed write, compared file by file afterwards.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch

import i2x.store.atomic as store_module  # where the atomic writes (and their os calls) live
from i2x.store import RunStore


def _run(tmp_path):
    store = RunStore.create(tmp_path / "run", model={"name": "m", "layer": "l"}, dataset={"name": "d"},
                            classes=["a", "b"], probe_indices=torch.arange(4), probe_labels=torch.tensor([0, 1, 0, 1]))
    store.write_checkpoint(1, torch.rand(4, 2, 2), torch.full((4, 2), 0.5))
    store.write_json("notes", {"v": 1})
    return store


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_checkpoint_that_cannot_be_written_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    store = _run(tmp_path)
    before = _snapshot(store.path)

    def half_then_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # part of the file reached the disk, then it filled up
        _disk_full()

    monkeypatch.setattr(store_module, "save_file", half_then_full)
    with pytest.raises(OSError, match="could not write .*step-000000002.safetensors: No space left on device") as info:
        store.write_checkpoint(2, torch.rand(4, 2, 2), torch.full((4, 2), 0.5))
    assert info.value.errno == errno.ENOSPC
    assert _snapshot(store.path) == before  # no half file, no temporary, the manifest as it was
    assert RunStore.open(store.path).finished_steps() == [1]


def test_a_manifest_that_cannot_be_written_leaves_the_step_unfinished(tmp_path, monkeypatch):
    store = _run(tmp_path)
    manifest = (store.path / "manifest.json").read_bytes()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("manifest.json"):
            _disk_full()
        return real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", replace)
    with pytest.raises(OSError, match="could not write .*manifest.json"):
        store.write_checkpoint(2, torch.rand(4, 2, 2), torch.full((4, 2), 0.5))
    monkeypatch.undo()
    assert (store.path / "manifest.json").read_bytes() == manifest
    assert not list(store.path.rglob(".i2x-tmp-*"))
    # The checkpoint file is there but not listed: not finished, so a resume records it again.
    again = RunStore.open(store.path)
    assert again.finished_steps() == [1]
    again.write_checkpoint(2, torch.rand(4, 2, 2), torch.full((4, 2), 0.5))
    assert RunStore.open(store.path).finished_steps() == [1, 2]


def test_a_stage_file_that_cannot_be_written_keeps_the_previous_version(tmp_path, monkeypatch):
    store = _run(tmp_path)
    before = _snapshot(store.path)
    monkeypatch.setattr(store_module.os, "fsync", _disk_full)
    with pytest.raises(OSError, match="could not write .*notes.json: No space left on device"):
        store.write_json("notes", {"v": 2})
    with pytest.raises(OSError, match="could not write .*extra.safetensors"):
        store.write_tensors("extra", {"x": torch.ones(3)})
    monkeypatch.undo()
    assert _snapshot(store.path) == before
    assert RunStore.open(store.path).read_json("notes") == {"v": 1} and not RunStore.open(store.path).has("extra")
