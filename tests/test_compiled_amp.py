"""Models as users train them: ``torch.compile``d, under bf16 autocast on the CPU, channels-last.

Truths: the same model explained eagerly in float32 and contiguous layout (the maps must agree:
exactly for the compiled wrapper, which explains through the same eager module and parameters;
within bf16's precision under autocast; to float rounding in channels-last), and the run an eager
Tracker writes.
"""

from __future__ import annotations

import pytest
import torch

import i2x
from i2x.store import RunStore

LAYER = "layer3"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net, layer = i2x.build_model("small-resnet", 10, in_channels=1, widths=(8, 16, 32))
    assert layer == LAYER
    return net.eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 28, 28, generator=g), torch.tensor([0, 1, 2, 3, 4, 5])


def test_a_compiled_model_is_explained_like_its_eager_module(model, batch):
    x, y = batch
    compiled = torch.compile(model)
    expected = i2x.Explainer(model, LAYER).explain(x, targets=y)
    for layer in (LAYER, f"_orig_mod.{LAYER}", model.get_submodule(LAYER)):
        explainer = i2x.Explainer(compiled, layer)
        assert explainer.layer_names == [LAYER]
        assert torch.equal(explainer.explain(x, targets=y), expected)


def test_capture_under_a_compiled_forward_says_what_to_do(model, batch):
    x, y = batch
    compiled = torch.compile(model)
    explainer = i2x.Explainer(compiled, LAYER)
    with explainer.capture() as captured:
        logits = compiled(x)
    with pytest.raises(RuntimeError, match=r"torch.compile'd forward .*\(compiled._orig_mod\)"):
        explainer.explain_from(captured, logits, y)
    # The eager module under capture() gives the eager explainer's grids.
    with explainer.capture() as captured:
        logits = compiled._orig_mod(x)
    eager = i2x.Explainer(model, LAYER)
    with eager.capture() as reference:
        reference_logits = model(x)
    assert torch.equal(explainer.explain_from(captured, logits, y), eager.explain_from(reference, reference_logits, y))


def test_the_tracker_records_a_compiled_model_as_the_eager_one(model, batch, tmp_path):
    x, y = batch
    probe = i2x.Probe(x, y, [str(c) for c in range(10)])
    for name, net in (("eager", model), ("compiled", torch.compile(model))):
        tracker = i2x.Tracker(net, LAYER, probe, tmp_path / name, schedule=[1], recalibrate_bn=0)
        tracker.step(1)
    eager, compiled = RunStore.open(tmp_path / "eager"), RunStore.open(tmp_path / "compiled")
    assert compiled.manifest["model"]["layer"] == LAYER
    for key in ("saliency", "probs"):
        assert torch.equal(compiled.load_checkpoint(1)[key], eager.load_checkpoint(1)[key])


def test_bf16_autocast_on_the_cpu_gives_float32_maps_close_to_float32(model, batch):
    x, y = batch
    explainer = i2x.Explainer(model, LAYER)
    expected = explainer.explain(x, targets=y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps, logits = explainer.explain(x, targets=y, return_logits=True)
    assert logits.dtype == torch.bfloat16 and maps.dtype == torch.float32
    assert maps.shape == expected.shape and bool(torch.isfinite(maps).all())
    # bf16 keeps 8 bits of mantissa: maps in [0, 1] agree to a few hundredths.
    assert (maps - expected).abs().max().item() < 0.08
    assert torch.corrcoef(torch.stack([maps.flatten(), expected.flatten()]))[0, 1].item() > 0.99


def test_a_channels_last_model_gives_the_same_maps(model, batch):
    x, y = batch
    expected = i2x.Explainer(model, LAYER).explain(x, targets=y)
    cl_model = i2x.build_model("small-resnet", 10, in_channels=1, widths=(8, 16, 32))[0].eval()
    cl_model.load_state_dict(model.state_dict())
    cl_model = cl_model.to(memory_format=torch.channels_last)
    got = i2x.Explainer(cl_model, LAYER).explain(x.contiguous(memory_format=torch.channels_last), targets=y)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
