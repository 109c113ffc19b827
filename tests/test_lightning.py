"""``i2x.integrations.lightning.TrackerCallback``: the Tracker driven by a Lightning ``Trainer``.

Truths: the same training without the callback (every parameter and buffer ``torch.equal``), and
post hoc tracking (``i2x.track_checkpoints``, one process) of the weights the training had at each
optimizer step, saved by a second callback; the schedule is ``i2x.log_schedule`` of the optimizer
steps counted by hand (gradient accumulation included). Under DDP (two gloo processes) the run
folder must be the one a single process writes for the same weights.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

import i2x  # noqa: E402
from i2x import Probe
from i2x import RunStore
from i2x import log_schedule
from i2x import track_checkpoints  # noqa: E402
from i2x.integrations.lightning import TrackerCallback  # noqa: E402

from _loop import TinyNet, image_dataset  # noqa: E402

LAYER = "model.layer"
BATCH, ACCUMULATE, EPOCHS, N_TRAIN = 8, 2, 2, 40
# 5 batches an epoch; accumulating 2, Lightning steps after batches 2, 4 and the epoch's last.
OPTIMIZER_STEPS = EPOCHS * 3
PROTOTYPES = {"n_prototypes": 3, "n_init": 1}


class Lit(L.LightningModule):
    """TinyNet behind input dropout (training draws from the global generator); its forward also
    draws one number in every mode, as a noise layer active in eval mode would."""

    def __init__(self):
        super().__init__()
        self.model = TinyNet(classes=3, width=4)
        self.drop = nn.Dropout(0.25)

    def forward(self, x):
        torch.rand(())
        return self.model(self.drop(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class NoForward(Lit):
    forward = L.LightningModule.forward  # training_step would compute the loss without it


class Snapshots(L.Callback):
    """Saves the weights after every optimizer step (rank 0): the post hoc truth."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.last = None

    def on_train_start(self, trainer, pl_module):
        self.last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.last and trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(pl_module.state_dict(), self.folder / f"step-{trainer.global_step}.pt")
        self.last = trainer.global_step


def _data():
    ds = image_dataset(n=N_TRAIN, classes=3, seed=0, signal=1.0)
    return ds, torch.utils.data.TensorDataset(ds.images, ds.labels)


def _probe():
    return Probe.from_dataset(_data()[0], size=12)


def _trainer(root, callbacks=(), **overrides):
    options = dict(accelerator="cpu", devices=1, max_epochs=EPOCHS, accumulate_grad_batches=ACCUMULATE,
                   deterministic=True, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(root), callbacks=list(callbacks))
    options.update(overrides)
    return L.Trainer(**options)


def _fit(root, callbacks=(), **overrides):
    """Seeded model and data order, trained; returns the trained module and its trainer."""
    L.seed_everything(0, verbose=False)
    module = Lit()
    loader = torch.utils.data.DataLoader(_data()[1], batch_size=BATCH, shuffle=True)
    trainer = _trainer(root, callbacks, **overrides)
    trainer.fit(module, loader)
    return module, trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    with torch.random.fork_rng(devices=[]):  # seed_everything: leave the session's random state alone
        plain, _ = _fit(root / "plain")
        callback = TrackerCallback(LAYER, _probe(), root / "run", prototypes=PROTOTYPES, n_checkpoints=4)
        tracked, trainer = _fit(root / "tracked", [callback, Snapshots(root / "snapshots")])
    return {"root": root, "plain": plain, "tracked": tracked, "trainer": trainer, "callback": callback}


def test_training_is_bit_identical_with_the_callback(runs):
    plain, tracked = runs["plain"].state_dict(), runs["tracked"].state_dict()
    assert plain.keys() == tracked.keys()
    unequal = [k for k in plain if not torch.equal(plain[k], tracked[k])]
    assert not unequal, f"tracking changed the training: {unequal}"
    assert runs["trainer"].global_step == OPTIMIZER_STEPS


def test_schedule_counts_optimizer_steps_and_the_run_is_complete(runs):
    store = RunStore.open(runs["root"] / "run")
    schedule = log_schedule(OPTIMIZER_STEPS, 4)
    assert runs["callback"].tracker.schedule == schedule
    assert store.manifest["schedule"]["planned_steps"] == OPTIMIZER_STEPS
    assert store.finished_steps() == schedule and store.final_step() == OPTIMIZER_STEPS
    assert store.has("prototypes") and store.stage("prototypes")["n_prototypes"] == 3
    weights = store.read_weights()
    final = runs["tracked"].state_dict()
    assert weights.keys() == final.keys() and all(torch.equal(weights[k], final[k]) for k in final)
    assert store.manifest["model"]["layer"] == LAYER and store.manifest["options"]["world_size"] == 1


def _post_hoc(snapshots: Path, steps, run_dir: Path) -> RunStore:
    pairs = [(s, snapshots / f"step-{s}.pt") for s in steps]
    return track_checkpoints(Lit(), LAYER, _probe(), pairs, run_dir, prototypes=PROTOTYPES)


def _assert_same_run(store: RunStore, truth: RunStore) -> None:
    assert store.finished_steps() == truth.finished_steps()
    for step in truth.finished_steps():
        a, b = store.load_checkpoint(step), truth.load_checkpoint(step)
        assert a["saliency"].float().abs().max() > 0
        torch.testing.assert_close(a["saliency"], b["saliency"], rtol=2e-3, atol=1e-3)
        torch.testing.assert_close(a["probs"], b["probs"], rtol=1e-5, atol=1e-6)
    mine, theirs = store.read_tensors("prototypes"), truth.read_tensors("prototypes")
    assert torch.equal(mine["assignment"], theirs["assignment"])
    for key in ("model", "dataset", "classes", "probe", "grid"):
        assert store.manifest[key] == truth.manifest[key], key


def test_records_equal_post_hoc_tracking_of_the_same_weights(runs):
    store = RunStore.open(runs["root"] / "run")
    truth = _post_hoc(runs["root"] / "snapshots", store.finished_steps(), runs["root"] / "posthoc")
    _assert_same_run(store, truth)


def _fit_expecting(error, match, root, callback, module=None):
    L.seed_everything(0, verbose=False)
    loader = torch.utils.data.DataLoader(_data()[1], batch_size=BATCH)
    trainer = _trainer(root, [callback], max_steps=2)
    with pytest.raises(error, match=match):
        trainer.fit(module or Lit(), loader)
    assert trainer.global_step == 0  # refused at fit start, before any training


def test_errors_come_at_fit_start(tmp_path):
    probe = _probe()
    _fit_expecting(ValueError, r"layer 'model.layr' is not a submodule of Lit; close candidates: 'model.layer'",
                   tmp_path, TrackerCallback("model.layr", probe, tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    _fit_expecting(TypeError, "probe: expected an i2x.Probe", tmp_path,
                   TrackerCallback(LAYER, [probe.images], tmp_path / "b"))
    _fit_expecting(TypeError, r"NoForward defines no forward\(\).*module='net'.*layer='net.layer4'", tmp_path,
                   TrackerCallback("layer", probe, tmp_path / "c"), NoForward())
    with pytest.raises(TypeError, match="prototypes: expected True, False or a dict"):
        TrackerCallback(LAYER, probe, tmp_path / "d", prototypes="yes")
    infinite = TrackerCallback(LAYER, probe, tmp_path / "e")
    trainer = _trainer(tmp_path, [infinite], max_epochs=-1, max_steps=-1)
    with pytest.raises(ValueError, match="estimated_stepping_batches is infinite"):
        trainer.fit(Lit(), torch.utils.data.DataLoader(_data()[1], batch_size=BATCH))


# -- the pattern people write: the network is self.net, training_step calls it, no forward() --------


class NetModule(L.LightningModule):
    """The same network, dropout and random draws as ``Lit``, held as ``self.net`` with no forward."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet(classes=3, width=4)
        self.drop = nn.Dropout(0.25)

    def training_step(self, batch, batch_idx):
        x, y = batch
        torch.rand(())
        return nn.functional.cross_entropy(self.net(self.drop(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class NetSnapshots(Snapshots):
    """The network's own weights after every optimizer step: what post hoc tracking of it reads."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.last and trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(pl_module.net.state_dict(), self.folder / f"step-{trainer.global_step}.pt")


def _fit_net(root, callbacks=()):
    L.seed_everything(0, verbose=False)
    module = NetModule()
    loader = torch.utils.data.DataLoader(_data()[1], batch_size=BATCH, shuffle=True)
    trainer = _trainer(root, callbacks)
    trainer.fit(module, loader)
    return module, trainer


def test_a_module_without_forward_is_tracked_through_the_network_it_names(tmp_path):
    with torch.random.fork_rng(devices=[]):
        plain, _ = _fit_net(tmp_path / "plain")
        by_module = TrackerCallback("layer", _probe(), tmp_path / "run", module="net", prototypes=PROTOTYPES,
                                    n_checkpoints=4)
        tracked, trainer = _fit_net(tmp_path / "tracked", [by_module, NetSnapshots(tmp_path / "snapshots")])
        by_path = TrackerCallback("net.layer", _probe(), tmp_path / "run2", prototypes=PROTOTYPES, n_checkpoints=4)
        _fit_net(tmp_path / "tracked2", [by_path])
    # Training is the same with and without the callback.
    assert all(torch.equal(v, tracked.state_dict()[k]) for k, v in plain.state_dict().items())
    store = RunStore.open(tmp_path / "run")
    assert store.finished_steps() == log_schedule(OPTIMIZER_STEPS, 4) and store.final_step() == OPTIMIZER_STEPS
    assert store.manifest["model"]["layer"] == "layer" and store.manifest["model"]["name"] == "TinyNet"
    weights = store.read_weights()
    assert weights.keys() == tracked.net.state_dict().keys()
    # The records are the network's: post hoc tracking of its saved weights gives the same run...
    truth = track_checkpoints(TinyNet(classes=3, width=4), "layer", _probe(),
                              [(s, tmp_path / "snapshots" / f"step-{s}.pt") for s in store.finished_steps()],
                              tmp_path / "posthoc", prototypes=PROTOTYPES)
    _assert_same_run(store, truth)
    # ... and naming it through the dotted layer path instead of module= does too.
    _assert_same_run(RunStore.open(tmp_path / "run2"), store)


class QuietNetModule(NetModule):
    """NetModule without dropout or random draws: a resumed fit replays the same steps exactly."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Identity()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


class CrashAt(L.Callback):
    """Stops the fit with an error once ``step`` optimizer steps are done (before other callbacks see it)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"crash at step {trainer.global_step}")


def _fit_quiet(root, callbacks, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    module = QuietNetModule()
    loader = torch.utils.data.DataLoader(_data()[1], batch_size=BATCH, shuffle=False)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_epochs=1)
    trainer = _trainer(root, [*callbacks, saver], enable_checkpointing=True)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module


def test_a_module_without_forward_resumes_after_a_crash_as_if_never_stopped(tmp_path):
    """module='net': a fit that crashes at step 5 and resumes from the epoch-1 checkpoint (step 3)
    writes the run an uninterrupted fit writes: step 4, recorded before the crash, is kept, not redone."""
    schedule = [1, 2, 4, 5]
    with torch.random.fork_rng(devices=[]):
        _fit_quiet(tmp_path / "whole", [TrackerCallback("layer", _probe(), tmp_path / "truth", module="net",
                                                        schedule=schedule, prototypes=PROTOTYPES)])
        tracker = TrackerCallback("layer", _probe(), tmp_path / "run", module="net", schedule=schedule,
                                  prototypes=PROTOTYPES)
        with pytest.raises(RuntimeError, match="crash at step 5"):
            _fit_quiet(tmp_path / "first", [CrashAt(5), tracker])
        partial = RunStore.open(tmp_path / "run")
        assert partial.finished_steps() == [1, 2, 4] and partial.final_step() is None
        resumed = TrackerCallback("layer", _probe(), tmp_path / "run", module="net", schedule=schedule,
                                  prototypes=PROTOTYPES)
        _fit_quiet(tmp_path / "first", [resumed], ckpt_path=tmp_path / "first" / "ckpt" / "last.ckpt")
    store, truth = RunStore.open(tmp_path / "run"), RunStore.open(tmp_path / "truth")
    assert store.final_step() == truth.final_step() == OPTIMIZER_STEPS
    _assert_same_run(store, truth)


def test_a_module_that_is_not_a_submodule_is_refused_at_fit_start(tmp_path):
    _fit_expecting(ValueError, r"module='nett' is not a submodule of NetModule \(its submodules: 'net', 'drop'\)",
                   tmp_path, TrackerCallback("layer", _probe(), tmp_path / "a", module="nett"), NetModule())
    _fit_expecting(TypeError, r"NetModule defines no forward\(\)", tmp_path,
                   TrackerCallback("layer", _probe(), tmp_path / "b"), NetModule())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_explicit_schedule_with_step_zero_records_the_untrained_model(tmp_path):
    with torch.random.fork_rng(devices=[]):
        callback = TrackerCallback(LAYER, _probe(), tmp_path / "run", schedule=[0, 3], prototypes=False,
                                   save_weights=False)
        _fit(tmp_path, [callback, Snapshots(tmp_path / "snapshots")], max_epochs=1)
        L.seed_everything(0, verbose=False)
        torch.save(Lit().state_dict(), tmp_path / "snapshots" / "step-0.pt")  # the same initial weights
    store = RunStore.open(tmp_path / "run")
    assert store.finished_steps() == [0, 3] and store.final_step() == 3
    assert not store.has("prototypes") and not (tmp_path / "run" / "weights.safetensors").exists()
    truth = track_checkpoints(Lit(), LAYER, _probe(), [(s, tmp_path / "snapshots" / f"step-{s}.pt") for s in (0, 3)],
                              tmp_path / "posthoc", prototypes=False)
    for step in (0, 3):
        a, b = store.load_checkpoint(step), truth.load_checkpoint(step)
        torch.testing.assert_close(a["saliency"], b["saliency"], rtol=2e-3, atol=1e-3)
        torch.testing.assert_close(a["probs"], b["probs"], rtol=1e-5, atol=1e-6)


def test_the_package_imports_no_framework_and_the_module_says_how_to_get_lightning(monkeypatch):
    code = "import sys, i2x.integrations; assert 'lightning' not in sys.modules, 'lightning imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # as if lightning were not installed
    monkeypatch.delitem(sys.modules, "i2x.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'i2x\[lightning\]'"):
        importlib.import_module("i2x.integrations.lightning")


# ----------------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo) write the run one process writes

_DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import test_lightning as t
    from i2x.integrations.lightning import TrackerCallback

    root = t.Path(sys.argv[2])
    callback = TrackerCallback(t.LAYER, t._probe(), root / "run", prototypes=t.PROTOTYPES, n_checkpoints=4)
    module, trainer = t._fit(root, [callback, t.Snapshots(root / "snapshots")], devices=2, strategy="ddp")
    print("rank", trainer.global_rank, "steps", trainer.global_step, "store", callback.store is not None)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(run: Path) -> list[str]:
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())


def test_ddp_on_cpu_writes_the_single_process_run(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": str(Path(i2x.__file__).resolve().parents[1])}
    tests = str(Path(__file__).resolve().parent)
    done = subprocess.run([sys.executable, str(script), tests, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    # Lightning relaunches the script for rank 1; both ranks share the output pipes.
    out = done.stdout
    assert "rank 0 steps" in out and "rank 1 steps" in out, out
    assert "store True" in out and "store False" in out, out  # only rank 0 holds (and writes) the run
    store = RunStore.open(tmp_path / "run")
    steps_done = int(out.split("rank 0 steps ")[1].split()[0])  # DDP halves the optimizer steps
    assert store.manifest["options"]["world_size"] == 2
    assert store.manifest["schedule"]["planned_steps"] == steps_done
    assert store.finished_steps() == log_schedule(steps_done, 4) and store.final_step() == steps_done
    truth = _post_hoc(tmp_path / "snapshots", store.finished_steps(), tmp_path / "posthoc")
    _assert_same_run(store, truth)
    assert _files(tmp_path / "run") == sorted(_files(tmp_path / "posthoc") + ["weights.safetensors"])


_DDP_NET_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import test_lightning as t
    from i2x.integrations.lightning import TrackerCallback

    root = t.Path(sys.argv[2])
    callback = TrackerCallback("layer", t._probe(), root / "run", module="net", prototypes=t.PROTOTYPES,
                               n_checkpoints=4)
    t.L.seed_everything(0, verbose=False)
    module = t.NetModule()
    loader = torch.utils.data.DataLoader(t._data()[1], batch_size=t.BATCH, shuffle=True)
    trainer = t._trainer(root, [callback, t.NetSnapshots(root / "snapshots")], devices=2, strategy="ddp")
    trainer.fit(module, loader)
    print("rank", trainer.global_rank, "steps", trainer.global_step, "store", callback.store is not None)
    """
)


def test_ddp_on_cpu_tracks_a_module_without_forward_through_the_network_it_names(tmp_path):
    """module='net' under DDP (two gloo processes): the run is the one post hoc tracking of the
    network's own weights writes in one process."""
    script = tmp_path / "ddp_net.py"
    script.write_text(_DDP_NET_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": str(Path(i2x.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(script), str(Path(__file__).resolve().parent), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "store True" in out and "store False" in out, out
    store = RunStore.open(tmp_path / "run")
    steps_done = int(out.split("rank 0 steps ")[1].split()[0])
    assert store.manifest["options"]["world_size"] == 2 and store.manifest["model"]["layer"] == "layer"
    assert store.finished_steps() == log_schedule(steps_done, 4) and store.final_step() == steps_done
    truth = track_checkpoints(TinyNet(classes=3, width=4), "layer", _probe(),
                              [(s, tmp_path / "snapshots" / f"step-{s}.pt") for s in store.finished_steps()],
                              tmp_path / "posthoc", prototypes=PROTOTYPES)
    _assert_same_run(store, truth)
