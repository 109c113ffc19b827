"""Checkpoint tracking: schedules, online records, post hoc over saved weights, resume, distributed.

Truths: a hand-computed log schedule; a plain-torch GradCAM (full backward with a hook on a deep
copy of the model in eval mode) and softmax for every record; post hoc tracking over the weights
saved during an online run must reproduce that run's records; two gloo processes must write the
same run as one process.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import i2x
from i2x.store import RunStore, RunStoreError
from i2x.track import Probe, Tracker, find_checkpoints, load_weights, log_schedule, track_checkpoints

from _models import NUM_CLASSES, tiny_cnn, tiny_input

LAYER = "features.5"
CLASSES = [f"c{i}" for i in range(NUM_CLASSES)]


def _probe(n=11, seed=3) -> Probe:
    x = tiny_input(n, seed=seed)
    y = torch.arange(n) % NUM_CLASSES
    return Probe(x, y, CLASSES, indices=torch.arange(100, 100 + n), dataset={"name": "noise", "split": "train"})


def _reference_record(model, probe):
    """GradCAM of the true class by a full backward on a copy (eval mode), and the softmax."""
    m = copy.deepcopy(model).eval()
    store = {}
    handle = dict(m.named_modules())[LAYER].register_forward_hook(lambda mod, i, o: store.__setitem__("a", o))
    logits = m(probe.images)
    handle.remove()
    a = store["a"]
    g = torch.autograd.grad(logits.gather(1, probe.labels[:, None]).sum(), a)[0]
    grid = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
    return grid.detach(), F.softmax(logits, 1).detach()


def _train_steps(model, steps, on_step):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = tiny_input(16, seed=9)
    y = torch.arange(16) % NUM_CLASSES
    for step in range(1, steps + 1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        on_step(step)


# ----------------------------------------------------------------------------------------------
# Schedules


def test_log_schedule_values():
    # first = 1% of 4690 = 46; 46 * (4690/46) ** (i / 11), rounded.
    assert log_schedule(4690) == [46, 70, 107, 162, 247, 376, 573, 873, 1329, 2023, 3080, 4690]
    assert log_schedule(100, 3, first_step=1) == [1, 10, 100]
    assert log_schedule(12) == list(range(1, 13))  # collisions resolved to consecutive steps
    assert log_schedule(5) == [1, 2, 3, 4, 5]  # fewer steps than checkpoints
    assert log_schedule(1) == [1]
    s = log_schedule(300)
    assert s[-1] == 300 and len(s) == 12 and all(a < b for a, b in zip(s, s[1:]))
    gaps = [b - a for a, b in zip(s, s[1:])]
    assert gaps == sorted(gaps)  # denser early


@pytest.mark.parametrize("args, error, match", [
    ((0,), ValueError, "planned_steps: expected a positive int"),
    ((10, 0), ValueError, "n_checkpoints: expected a positive int"),
    ((10, 3, 11), ValueError, r"first_step: expected an int in \[1, planned_steps=10\]"),
    ((2.5,), TypeError, "planned_steps: expected a positive int"),
])
def test_log_schedule_errors(args, error, match):
    with pytest.raises(error, match=match):
        log_schedule(*args)


# ----------------------------------------------------------------------------------------------
# Online


def test_online_records_match_plain_gradcam_and_leave_the_model_alone(tmp_path):
    torch.manual_seed(0)
    model = tiny_cnn()
    probe = _probe()
    tracker = Tracker(model, LAYER, probe, tmp_path / "run", schedule=[2, 4, 6], recalibrate_bn=0)
    expected = {}
    # A user who keeps one BatchNorm in eval while training: the tracker must not flip it.
    model.features[1].eval()

    def on_step(step):
        grads_before = [p.grad.clone() for p in model.parameters()]
        if tracker.is_scheduled(step):
            expected[step] = _reference_record(model, probe)
        recorded = tracker.step(step)
        assert recorded == (step in (2, 4, 6))
        assert model.training and not model.features[1].training
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_before))

    _train_steps(model, 6, on_step)
    store = RunStore.open(tmp_path / "run")
    assert store.finished_steps() == [2, 4, 6]
    assert store.grid == (8, 8)
    for step, (grid, probs) in expected.items():
        rec = store.load_checkpoint(step)
        assert grid.abs().max() > 0  # not a degenerate all-zero map
        torch.testing.assert_close(rec["saliency"].float(), grid, rtol=2e-3, atol=1e-3)  # float16 storage
        torch.testing.assert_close(rec["probs"], probs, rtol=1e-5, atol=1e-6)
    manifest = store.manifest
    assert manifest["model"] == {"name": "TinyCNN", "layer": LAYER, "method": "gradcam"}
    assert manifest["dataset"] == {"name": "noise", "split": "train"}
    assert manifest["schedule"]["steps"] == [2, 4, 6]
    indices, labels = store.probe()
    assert indices.tolist() == list(range(100, 111)) and torch.equal(labels, probe.labels)


def _recalibrated_copy(model, images):
    """A copy whose BatchNorm statistics are those of ``images`` (one batch, unbiased variance)."""
    m = copy.deepcopy(model)
    captured = {}
    bn = m.features[1]
    handle = bn.register_forward_hook(lambda mod, i, o: captured.__setitem__("x", i[0]))
    with torch.no_grad():
        m.eval()(images)
    handle.remove()
    x = captured["x"]
    with torch.no_grad():
        bn.running_mean.copy_(x.mean((0, 2, 3)))
        bn.running_var.copy_(x.var((0, 2, 3), unbiased=True))
    return m


def test_recalibrated_batchnorm_records_and_restores(tmp_path):
    torch.manual_seed(0)
    model = tiny_cnn()
    probe = _probe()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    tracker = Tracker(model, LAYER, probe, tmp_path / "run", schedule=[1], recalibrate_bn=len(probe), batch_size=64)
    assert tracker.store.manifest["options"]["recalibrate_bn"] == len(probe)
    tracker.step(1)
    grid, probs = _reference_record(_recalibrated_copy(model, probe.images), probe)
    plain_grid, _ = _reference_record(model, probe)
    assert not torch.allclose(grid, plain_grid, atol=1e-2)  # the statistics really differ
    rec = RunStore.open(tmp_path / "run").load_checkpoint(1)
    torch.testing.assert_close(rec["saliency"].float(), grid, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(rec["probs"], probs, rtol=1e-4, atol=1e-5)
    for k, v in model.state_dict().items():
        if k in buffers:
            assert torch.equal(v, buffers[k]), k
    assert model.features[1].momentum == 0.1 and model.training
    with pytest.raises(ValueError, match="recalibrate_bn: expected an int >= 0"):
        Tracker(model, LAYER, probe, tmp_path / "r2", schedule=[1], recalibrate_bn=-3)


def test_finish_marks_the_final_model_and_resume_skips_finished_steps(tmp_path):
    torch.manual_seed(0)
    model = tiny_cnn()
    probe = _probe()
    tracker = Tracker(model, LAYER, probe, tmp_path / "run", planned_steps=8, n_checkpoints=3, first_step=2)
    assert tracker.schedule == [2, 4, 8]
    _train_steps(model, 5, tracker.step)  # "killed" after step 5
    assert RunStore.open(tmp_path / "run").finished_steps() == [2, 4]

    again = Tracker(model, LAYER, probe, tmp_path / "run", planned_steps=8, n_checkpoints=3, first_step=2)
    before = RunStore.open(tmp_path / "run").load_checkpoint(2)["saliency"].clone()
    assert again.step(2) is False and again.step(4) is False  # already finished: not redone
    assert again.step(8) is True
    store = again.finish(9, prototypes=False)
    assert store.finished_steps() == [2, 4, 8, 9] and store.final_step() == 9
    assert torch.equal(store.load_checkpoint(2)["saliency"], before)


def test_tracker_refuses_a_run_folder_of_another_run(tmp_path):
    model = tiny_cnn()
    Tracker(model, LAYER, _probe(), tmp_path / "run", schedule=[1])
    with pytest.raises(RunStoreError, match="holds a different run: its 'model'"):
        Tracker(model, "features.3", _probe(), tmp_path / "run", schedule=[1])
    with pytest.raises(RunStoreError, match="its 'probe'"):
        Tracker(model, LAYER, _probe(n=12), tmp_path / "run", schedule=[1])


def test_tracker_input_errors(tmp_path):
    model = tiny_cnn()
    with pytest.raises(ValueError, match="give planned_steps"):
        Tracker(model, LAYER, _probe(), tmp_path / "a")
    with pytest.raises(ValueError, match="the tracker needs the target layer named"):
        Tracker(model, None, _probe(), tmp_path / "b", schedule=[1])
    with pytest.raises(TypeError, match="probe: expected an i2x.Probe"):
        Tracker(model, LAYER, [1, 2, 3], tmp_path / "c", schedule=[1])
    with pytest.raises(ValueError, match=r"probe labels: expected values in \[0, 4\]"):
        Probe(tiny_input(2), torch.tensor([0, 7]), CLASSES)
    with pytest.raises(ValueError, match="probe: 2 images but 3 labels"):
        Probe(tiny_input(2), torch.tensor([0, 1, 2]), CLASSES)
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        Tracker(model, LAYER, _probe(), tmp_path / "d", schedule=[1], batch_size=0)
    with pytest.raises(ValueError, match="schedule: steps must be >= 0"):
        Tracker(model, LAYER, _probe(), tmp_path / "e", schedule=[-1, 3])


def test_pair_probe_with_small_batches_equals_one_batch(tmp_path):
    model = tiny_cnn()
    probe = _probe()
    Tracker(model, LAYER, (probe.images, probe.labels), tmp_path / "a", schedule=[1], classes=CLASSES,
            batch_size=4).step(1)
    Tracker(model, LAYER, (probe.images, probe.labels), tmp_path / "b", schedule=[1], classes=CLASSES,
            batch_size=64).step(1)
    a = RunStore.open(tmp_path / "a").load_checkpoint(1)
    b = RunStore.open(tmp_path / "b").load_checkpoint(1)
    torch.testing.assert_close(a["saliency"], b["saliency"], rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(a["probs"], b["probs"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Post hoc


def _save_variants(state, folder: Path, step: int) -> None:
    """Four ways users save weights: safetensors, a plain state dict, a nested training
    checkpoint, a DDP-prefixed state dict."""
    kind = step % 4
    if kind == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"model-step{step}.safetensors"))
    elif kind == 1:
        torch.save(state, folder / f"step_{step}.pt")
    elif kind == 2:
        torch.save({"epoch": 3, "state_dict": state, "optimizer": {"lr": 0.1}}, folder / f"ckpt-{step}.pth")
    else:
        torch.save({f"module.{k}": v for k, v in state.items()}, folder / f"ddp_{step}.pt")


def test_post_hoc_equals_online_and_restores_weights(tmp_path):
    torch.manual_seed(0)
    model = tiny_cnn()
    probe = _probe()
    folder = tmp_path / "ckpts"
    folder.mkdir()
    tracker = Tracker(model, LAYER, probe, tmp_path / "online", schedule=[1, 2, 3, 4])

    def on_step(step):
        tracker.step(step)
        _save_variants({k: v.clone() for k, v in model.state_dict().items()}, folder, step)

    _train_steps(model, 4, on_step)
    fresh = tiny_cnn(seed=7)
    weights_before = {k: v.clone() for k, v in fresh.state_dict().items()}
    store = track_checkpoints(fresh, LAYER, probe, folder, tmp_path / "posthoc", prototypes=False)
    assert store.finished_steps() == [1, 2, 3, 4] and store.final_step() == 4
    online = RunStore.open(tmp_path / "online")
    for step in (1, 2, 3, 4):
        a, b = online.load_checkpoint(step), store.load_checkpoint(step)
        torch.testing.assert_close(a["saliency"], b["saliency"], rtol=2e-3, atol=1e-3)
        torch.testing.assert_close(a["probs"], b["probs"], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, weights_before[k]) for k, v in fresh.state_dict().items())
    # Resuming a finished post hoc run redoes nothing.
    mtime = (tmp_path / "posthoc" / "checkpoints" / "step-000000002.safetensors").stat().st_mtime_ns
    track_checkpoints(fresh, LAYER, probe, folder, tmp_path / "posthoc", prototypes=False)
    assert (tmp_path / "posthoc" / "checkpoints" / "step-000000002.safetensors").stat().st_mtime_ns == mtime


class _NotWeights:
    pass


def test_checkpoint_file_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint files"):
        find_checkpoints(empty)
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        find_checkpoints(tmp_path / "nowhere")
    nonum = tmp_path / "nonum"
    nonum.mkdir()
    torch.save({"w": torch.zeros(1)}, nonum / "final.pt")
    with pytest.raises(ValueError, match="final.pt: its name has no step number"):
        find_checkpoints(nonum)
    dup = tmp_path / "dup"
    dup.mkdir()
    torch.save({"w": torch.zeros(1)}, dup / "a-3.pt")
    torch.save({"w": torch.zeros(1)}, dup / "b-3.pt")
    with pytest.raises(ValueError, match="both claim step 3"):
        find_checkpoints(dup)
    # A pickled arbitrary object is never unpickled.
    torch.save({"obj": _NotWeights()}, tmp_path / "evil-1.pt")
    with pytest.raises(ValueError, match="evil-1.pt: cannot be read as weights"):
        load_weights(tmp_path / "evil-1.pt")
    (tmp_path / "broken-1.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="broken-1.safetensors: cannot be read as weights"):
        load_weights(tmp_path / "broken-1.safetensors")
    torch.save({"lr": 0.1}, tmp_path / "opt-1.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        load_weights(tmp_path / "opt-1.pt")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong / "step-1.pt")
    with pytest.raises(ValueError, match="step-1.pt do not fit the model"):
        track_checkpoints(tiny_cnn(), LAYER, _probe(), wrong, tmp_path / "r", prototypes=False)


# ----------------------------------------------------------------------------------------------
# Distributed: two gloo processes write the same run as one process

_RANK = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist, torch.nn.functional as F
    from torch import nn
    sys.path.insert(0, sys.argv[5])
    from _models import tiny_cnn, tiny_input
    from i2x.track import Probe, Tracker

    rank, world, port, run = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ckpts = sys.argv[6]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(tiny_cnn())
    x = tiny_input(13, seed=3)
    probe = Probe(x, torch.arange(13) % 5, [f"c{i}" for i in range(5)], dataset={"name": "noise"})
    tracker = Tracker(model, "features.5", probe, run, schedule=[1, 2, 3], batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = tiny_input(16, seed=9 + rank)   # each rank trains on its own data; DDP keeps them in sync
    y = torch.arange(16) % 5
    for step in (1, 2, 3):
        opt.zero_grad()
        F.cross_entropy(model(data), y).backward()
        opt.step()
        buffers = [b.clone() for b in model.module.buffers()]
        tracker.step(step)
        # Recording borrows rank 0's BatchNorm statistics and must hand this rank's back.
        assert all(torch.equal(a, b) for a, b in zip(buffers, model.module.buffers())), "buffers changed"
        if rank == 0:
            torch.save(model.module.state_dict(), f"{ckpts}/step-{step}.pt")
    dist.barrier()
    dist.destroy_process_group()
    print("rank", rank, "done")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_tracking_equals_single_process(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(Path(i2x.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    tests_dir = str(Path(__file__).resolve().parent)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", port, str(tmp_path / "dist"), tests_dir,
                               str(ckpts)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    dist_store = RunStore.open(tmp_path / "dist")
    assert dist_store.finished_steps() == [1, 2, 3]
    assert dist_store.manifest["options"]["world_size"] == 2
    probe = Probe(tiny_input(13, seed=3), torch.arange(13) % 5, CLASSES, dataset={"name": "noise"})
    single = track_checkpoints(tiny_cnn(), LAYER, probe, ckpts, tmp_path / "single", prototypes=False, batch_size=4)
    for step in (1, 2, 3):
        a, b = dist_store.load_checkpoint(step), single.load_checkpoint(step)
        assert a["saliency"].float().abs().max() > 0
        torch.testing.assert_close(a["saliency"], b["saliency"], rtol=2e-3, atol=1e-3)
        torch.testing.assert_close(a["probs"], b["probs"], rtol=1e-5, atol=1e-6)
    m_dist, m_single = dist_store.manifest, single.manifest
    for key in ("model", "dataset", "classes", "probe", "grid"):
        assert m_dist[key] == m_single[key], key


# ----------------------------------------------------------------------------------------------
# A tracking process killed mid-checkpoint resumes to the uninterrupted result

_TRACK_CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, sys.argv[4])
    import i2x.store.atomic as store_mod
    from _models import tiny_cnn, tiny_input
    from i2x.track import Probe, track_checkpoints

    ckpts, run, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real_save = store_mod.save_file
    calls = {"n": 0}

    def dying_save(tensors, filename, metadata=None):
        # Die with half of checkpoint number `kill_at` written to its temporary file.
        if "saliency" in tensors:
            calls["n"] += 1
            if calls["n"] == kill_at:
                with open(filename, "wb") as f:
                    f.write(b"half")
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(tensors, filename, metadata=metadata)

    store_mod.save_file = dying_save
    probe = Probe(tiny_input(11, seed=3), torch.arange(11) % 5, [f"c{i}" for i in range(5)], dataset={"name": "noise"})
    store = track_checkpoints(tiny_cnn(), "features.5", probe, ckpts, run, prototypes={"n_prototypes": 4})
    print("finished", store.finished_steps(), store.has("prototypes"))
    """
)


def test_killed_tracking_process_resumes_to_the_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    model = tiny_cnn()
    folder = tmp_path / "ckpts"
    folder.mkdir()
    _train_steps(model, 4, lambda step: torch.save(model.state_dict(), folder / f"step-{step}.pt"))
    script = tmp_path / "child.py"
    script.write_text(_TRACK_CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(i2x.__file__).resolve().parents[1])}
    tests_dir = str(Path(__file__).resolve().parent)

    def child(run, kill_at):
        return subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / run), str(kill_at), tests_dir],
                              capture_output=True, text=True, timeout=300, env=env)

    whole = child("whole", 0)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = child("killed", 3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert RunStore.open(tmp_path / "killed").finished_steps() == [1, 2]
    resumed = child("killed", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "finished [1, 2, 3, 4] True" in resumed.stdout
    a, b = RunStore.open(tmp_path / "whole"), RunStore.open(tmp_path / "killed")
    for step in (1, 2, 3, 4):
        ra, rb = a.load_checkpoint(step), b.load_checkpoint(step)
        assert torch.equal(ra["saliency"], rb["saliency"]) and torch.equal(ra["probs"], rb["probs"])
    pa, pb = a.read_tensors("prototypes"), b.read_tensors("prototypes")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not list((tmp_path / "killed").rglob(".i2x-tmp-*"))
