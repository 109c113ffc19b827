"""The explainer on a DistributedDataParallel-wrapped model (gloo, one CPU process).

Truth: the same model unwrapped. DDP adds its own forward pre-processing and gradient hooks; the
explainer must find the layer under ``module.``, give the same maps, and in a training step leave
DDP's gradient synchronisation and the parameter gradients exactly as without i2x.
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from i2x import Explainer

from _models import tiny_cnn, tiny_input


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def process_group():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if dist.is_initialized():  # another test module left one: use it
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_explain_matches_unwrapped(process_group):
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    x = tiny_input()
    plain = Explainer(model, "features.4").explain(x, 1)
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    for spec in ("features.4", "module.features.4"):
        explainer = Explainer(ddp, spec)
        assert explainer.layer_names == ["module.features.4"]
        assert torch.equal(explainer.explain(x, 1), plain)
    for module in ddp.modules():
        assert not module._forward_hooks


def test_ddp_training_step_gradients_unchanged(process_group):
    torch.manual_seed(0)
    base = tiny_cnn().train()
    x = tiny_input()
    y = torch.tensor([1, 0, 2])

    def step(with_i2x: bool):
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        explainer = Explainer(ddp, "features.4")
        if with_i2x:
            with explainer.capture() as captured:
                logits = ddp(x)
            grids = explainer.explain_from(captured, logits, y)
            assert all(p.grad is None for p in ddp.parameters())  # nothing reached the parameters
        else:
            logits = ddp(x)
            grids = None
        F.cross_entropy(logits, y).backward()
        return ddp, grids

    without, _ = step(False)
    with_, grids = step(True)
    assert grids.shape[0] == 3 and grids.dim() == 3 and float(grids.max()) > 0
    for (name, p_without), (_, p_with) in zip(without.named_parameters(), with_.named_parameters()):
        assert torch.equal(p_without.grad, p_with.grad), name
    for (name, b_without), (_, b_with) in zip(without.named_buffers(), with_.named_buffers()):
        assert torch.equal(b_without, b_with), name
