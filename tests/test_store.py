"""The run store: atomic writes, resume after a kill, and clear errors for corrupt or foreign folders.

Truths: the tensors written (read back bit-exactly, saliency as float16), an uninterrupted run (a
run killed mid-checkpoint and resumed must end with identical files), and the exact messages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import i2x

from i2x.store import FORMAT_VERSION, RunStore, RunStoreError, atomic_write_bytes

N, M, H, W = 6, 3, 4, 5


def _create(path, **over):
    args = dict(
        model={"name": "tiny", "layer": "features.3", "method": "gradcam"},
        dataset={"name": "synthetic", "split": "train"},
        classes=["a", "b", "c"],
        probe_indices=torch.arange(10, 10 + N),
        probe_labels=torch.tensor([0, 1, 2, 0, 1, 2]),
        schedule={"kind": "explicit", "steps": [1, 5]},
    )
    args.update(over)
    return RunStore.create(path, **args)


def _record(seed):
    g = torch.Generator().manual_seed(seed)
    sal = torch.rand(N, H, W, generator=g) * 3
    probs = torch.softmax(torch.randn(N, M, generator=g), 1)
    return sal, probs


def test_roundtrip_and_manifest(tmp_path):
    store = _create(tmp_path / "run")
    sal, probs = _record(0)
    store.write_checkpoint(5, sal, probs)
    sal1, probs1 = _record(1)
    store.write_checkpoint(1, sal1, probs1, final=False)
    again = RunStore.open(tmp_path / "run")
    assert again.finished_steps() == [1, 5]
    assert again.grid == (H, W)
    rec = again.load_checkpoint(5)
    assert rec["saliency"].dtype == torch.float16
    torch.testing.assert_close(rec["saliency"], sal.half(), rtol=0, atol=0)
    torch.testing.assert_close(rec["probs"], probs, rtol=0, atol=0)
    steps, s_all, p_all = again.load_all()
    assert steps == [1, 5] and s_all.shape == (2, N, H, W) and p_all.shape == (2, N, M)
    torch.testing.assert_close(p_all[0], probs1, rtol=0, atol=0)
    indices, labels = again.probe()
    assert indices.tolist() == list(range(10, 16)) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert [c["step"] for c in manifest["checkpoints"]] == [1, 5]
    # Rewriting a step replaces it instead of listing it twice.
    store.write_checkpoint(5, sal1, probs1, final=True)
    assert RunStore.open(tmp_path / "run").finished_steps() == [1, 5]
    assert RunStore.open(tmp_path / "run").final_step() == 5


def test_reopen_same_run_keeps_checkpoints_and_refuses_a_different_one(tmp_path):
    store = _create(tmp_path / "run")
    store.write_checkpoint(1, *_record(0))
    assert _create(tmp_path / "run").finished_steps() == [1]
    with pytest.raises(RunStoreError, match=r"holds a different run: its 'model'"):
        _create(tmp_path / "run", model={"name": "tiny", "layer": "features.5", "method": "gradcam"})
    with pytest.raises(RunStoreError, match=r"its 'probe'"):
        _create(tmp_path / "run", probe_labels=torch.tensor([0, 1, 2, 0, 1, 1]))


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunStoreError, match="is not empty but has no manifest.json"):
        _create(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(RunStoreError, match="is not an i2x run folder"):
        RunStore.open(tmp_path / "other")
    with pytest.raises(RunStoreError, match="does not exist"):
        RunStore.open(tmp_path / "missing")


def test_corrupt_manifest(tmp_path):
    _create(tmp_path / "run")
    (tmp_path / "run" / "manifest.json").write_text('{"format": "i2x-run", "format_ver')
    with pytest.raises(RunStoreError, match="manifest.json is not valid JSON"):
        RunStore.open(tmp_path / "run")


def test_foreign_manifest(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text('{"name": "some other tool"}')
    with pytest.raises(RunStoreError, match="is not an i2x run manifest"):
        RunStore.open(tmp_path / "run")


def test_wrong_format_version(tmp_path):
    _create(tmp_path / "run")
    path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(RunStoreError, match=rf"format version {FORMAT_VERSION + 1}; this i2x reads version {FORMAT_VERSION}"):
        RunStore.open(tmp_path / "run")


def test_manifest_with_a_broken_field(tmp_path):
    _create(tmp_path / "run")
    path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["checkpoints"] = [{"step": "five"}]
    path.write_text(json.dumps(manifest))
    with pytest.raises(RunStoreError, match="checkpoint entry .* lacks an integer 'step'"):
        RunStore.open(tmp_path / "run")


def test_missing_checkpoint_file(tmp_path):
    store = _create(tmp_path / "run")
    store.write_checkpoint(1, *_record(0))
    (tmp_path / "run" / "checkpoints" / "step-000000001.safetensors").unlink()
    with pytest.raises(RunStoreError, match="is missing from run .* although the manifest lists it"):
        RunStore.open(tmp_path / "run").load_checkpoint(1)


def test_corrupt_checkpoint_file(tmp_path):
    store = _create(tmp_path / "run")
    store.write_checkpoint(1, *_record(0))
    path = tmp_path / "run" / "checkpoints" / "step-000000001.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    # The hash recorded at write catches it first...
    with pytest.raises(RunStoreError, match="step-000000001.safetensors changed after it was written"):
        RunStore.open(tmp_path / "run").load_checkpoint(1)
    # ...and a run written before hashes were recorded still gets a clear error from the reader.
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    del manifest["checkpoints"][0]["sha256"]
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunStoreError, match="is not a readable safetensors file"):
        RunStore.open(tmp_path / "run").load_checkpoint(1)


def test_corrupt_probe_file(tmp_path):
    _create(tmp_path / "run")
    (tmp_path / "run" / "probe.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(RunStoreError, match="probe.safetensors is not a readable safetensors file"):
        RunStore.open(tmp_path / "run")


def test_bad_records_are_refused_and_nothing_is_written(tmp_path):
    store = _create(tmp_path / "run")
    sal, probs = _record(0)
    with pytest.raises(ValueError, match=r"saliency: expected a \[6, h, w\] tensor"):
        store.write_checkpoint(1, sal[:3], probs)
    with pytest.raises(ValueError, match=r"probs: expected a \[6, 3\] tensor"):
        store.write_checkpoint(1, sal, probs[:, :2])
    bad = sal.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        store.write_checkpoint(1, bad, probs)
    with pytest.raises(ValueError, match="step: expected a non-negative int"):
        store.write_checkpoint(-1, sal, probs)
    store.write_checkpoint(1, sal, probs)
    with pytest.raises(ValueError, match=r"expected the run's grid \[4, 5\]"):
        store.write_checkpoint(2, torch.rand(N, 3, 3), probs)
    assert RunStore.open(tmp_path / "run").finished_steps() == [1]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000000001.safetensors"]


def test_bad_probe_and_names(tmp_path):
    with pytest.raises(ValueError, match="probe_indices and probe_labels differ in length"):
        _create(tmp_path / "a", probe_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"probe_labels: expected values in \[0, 2\]"):
        _create(tmp_path / "b", probe_labels=torch.tensor([0, 1, 2, 0, 1, 3]))
    with pytest.raises(ValueError, match="probe_indices: the probe set is empty"):
        _create(tmp_path / "c", probe_indices=torch.zeros(0, dtype=torch.long), probe_labels=torch.zeros(0, dtype=torch.long))
    store = _create(tmp_path / "d")
    with pytest.raises(ValueError, match="artefact name '../x'"):
        store.write_json("../x", {})
    with pytest.raises(ValueError, match="must be plain JSON"):
        store.write_json("analysis", {"x": float("nan")})
    assert not (tmp_path / "d" / "analysis.json").exists()


def test_artefacts_roundtrip(tmp_path):
    store = _create(tmp_path / "run")
    store.write_tensors("prototypes", {"assignment": torch.zeros(N, H, W, dtype=torch.long)}, record={"k": 4})
    store.write_json("analysis", {"answer": [1, 2]}, record={"v": 1})
    again = RunStore.open(tmp_path / "run")
    assert again.has("prototypes") and again.stage("prototypes")["k"] == 4
    assert again.read_json("analysis") == {"answer": [1, 2]}
    assert again.read_tensors("prototypes", ["assignment"])["assignment"].shape == (N, H, W)
    with pytest.raises(RunStoreError, match=r"lacks the tensors \['centroids'\]"):
        again.read_tensors("prototypes", ["centroids"])
    with pytest.raises(FileNotFoundError, match="has no report.json"):
        again.read_json("report")


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    class Boom(Exception):
        pass

    def failing_fsync(fd):
        raise Boom()

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(Boom):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # the temporary file is gone too


# ----------------------------------------------------------------------------------------------
# Kill a writer mid-checkpoint, resume, compare with an uninterrupted run

_WRITER = textwrap.dedent(
    """
    import os, signal, sys, torch
    import i2x.store.atomic as atomic_mod
    import i2x.store.runstore as runstore_mod
    from i2x.store import RunStore

    run, kill_at, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    N, M, H, W = 6, 3, 4, 5
    calls = {"n": 0}
    real_save, real_json = atomic_mod.save_file, runstore_mod.atomic_write_json

    def dying_save(tensors, filename, metadata=None):
        # Die halfway through writing the temporary file of checkpoint number `kill_at`.
        if "saliency" in tensors:
            calls["n"] += 1
            if where == "tensor" and calls["n"] == kill_at:
                with open(filename, "wb") as f:
                    f.write(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(tensors, filename, metadata=metadata)

    def dying_manifest(path, obj):
        # Die after the checkpoint file is in place but before the manifest lists it.
        if where == "manifest" and calls["n"] == kill_at and obj["checkpoints"] and len(obj["checkpoints"]) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_json(path, obj)

    atomic_mod.save_file = dying_save
    runstore_mod.atomic_write_json = dying_manifest
    store = RunStore.create(run, model={"name": "tiny", "layer": "l", "method": "gradcam"},
                            dataset={"name": "synthetic"}, classes=["a", "b", "c"],
                            probe_indices=torch.arange(N), probe_labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    for step in (1, 3, 7, 15):
        if store.has_checkpoint(step):
            continue
        g = torch.Generator().manual_seed(step)
        store.write_checkpoint(step, torch.rand(N, H, W, generator=g), torch.softmax(torch.randn(N, M, generator=g), 1),
                               final=step == 15)
    print("done", store.finished_steps())
    """
)


def _write_run(path: Path, kill_at: int = 0, where: str = "none") -> subprocess.CompletedProcess:
    script = path.parent / "writer.py"
    script.write_text(_WRITER)
    # The child imports the same i2x as this process (installed build, or a source tree built in place).
    env = {**os.environ, "PYTHONPATH": str(Path(i2x.__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, str(script), str(path), str(kill_at), where],
                          capture_output=True, text=True, timeout=120, cwd=path.parent, env=env)


@pytest.mark.parametrize("where", ["tensor", "manifest"])
def test_killed_writer_resumes_to_the_uninterrupted_result(tmp_path, where):
    reference = _write_run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    killed = _write_run(tmp_path / "killed", kill_at=3, where=where)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    partial = RunStore.open(tmp_path / "killed")
    assert partial.finished_steps() == [1, 3]  # the third checkpoint never became finished
    resumed = _write_run(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert "done [1, 3, 7, 15]" in resumed.stdout
    for step in (1, 3, 7, 15):
        name = f"checkpoints/step-{step:09d}.safetensors"
        a = load_file(str(tmp_path / "reference" / name))
        b = load_file(str(tmp_path / "killed" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    leftovers = [p.name for p in (tmp_path / "killed").rglob(".i2x-tmp-*")]
    assert leftovers == []
    m_ref = json.loads((tmp_path / "reference" / "manifest.json").read_text())
    m_res = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert [(c["step"], c["final"]) for c in m_ref["checkpoints"]] == [(c["step"], c["final"]) for c in m_res["checkpoints"]]
