"""i2x.integrations.timm on timm models (random weights, eval mode, small inputs).

Truths: pytorch-grad-cam's GradCAM at the same layer (CNNs; for ViTs with a reshape_transform
written here from timm's token layout, not from i2x's), hand-made token tensors whose values name
their position, the layer names timm and pytorch-grad-cam document, and a tracked run compared
with pytorch-grad-cam's maps of the final model.

Tolerances are those of tests/test_cam_peers.py: raw maps 1e-5 |expected| + 1e-5 max|expected|
(float32 summation order over up to 2048 channels), normalised maps 2e-5 absolute.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CAM_NORM_ATOL as NORM_ATOL, CAM_RAW_ATOL as RAW_ATOL, CAM_RAW_RTOL as RAW_RTOL, assert_close

import i2x
from i2x.integrations import timm as i2x_timm

timm = pytest.importorskip("timm")
pgc = pytest.importorskip("pytorch_grad_cam")
pgc_targets = pytest.importorskip("pytorch_grad_cam.utils.model_targets")

NUM_CLASSES = 5
TARGETS = [2, 0]  # per image; maps of random weights for these are not degenerate (asserted)


@functools.lru_cache(maxsize=None)
def _model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval()


def _x(h: int, w: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1))


def _pgc_maps(model, layer: str, x, targets, reshape_transform=None):
    """pytorch-grad-cam's GradCAM: (raw relu'd map on the layer's grid, normalised on that grid,
    normalised at the input size)."""
    module = model.get_submodule(layer)
    wanted = [pgc_targets.ClassifierOutputTarget(t) for t in targets]
    with pgc.GradCAM(model=model, target_layers=[module], reshape_transform=reshape_transform) as cam:
        at_input = cam(input_tensor=x, targets=wanted)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = np.maximum(cam.get_cam_image(x, module, wanted, acts, grads, False), 0)
        grid = tuple(raw.shape[-2:])
        # their whole pipeline with the layer's grid as the "input" size
        on_grid = cam.aggregate_multi_layers(cam.compute_cam_per_layer(torch.empty(len(x), 3, *grid), wanted, False))
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam ran loss.backward() on the shared model
    raw = torch.from_numpy(np.ascontiguousarray(raw)).float()
    return raw, torch.from_numpy(on_grid), torch.from_numpy(at_input)


def _assert_not_degenerate(raw: torch.Tensor) -> None:
    hi, lo = raw.amax(dim=(1, 2)), raw.amin(dim=(1, 2))
    assert bool((hi > 1e-6).all()), f"degenerate maps (max {hi.tolist()})"
    assert bool((hi - lo > 1e-3 * hi).all()), f"near-constant maps (max {hi.tolist()}, min {lo.tolist()})"


def _hooks(model) -> dict[str, int]:
    return {n: len(m._forward_hooks) + len(m._backward_hooks) for n, m in model.named_modules()}


def _assert_matches_pgc(explainer, model, layer, x, targets, grid, reshape_transform=None, tag=""):
    hooks_before = _hooks(model)
    theirs_raw, theirs_grid, theirs_input = _pgc_maps(model, layer, x, targets, reshape_transform)
    assert tuple(theirs_raw.shape) == (len(x), *grid)
    _assert_not_degenerate(theirs_raw)
    ours_raw = explainer.explain(x, targets, size=None, normalize=False)
    assert_close(ours_raw, theirs_raw, rtol=RAW_RTOL, atol=RAW_ATOL, tag=f"timm:pgc:raw:{tag}")
    ours_grid = explainer.explain(x, targets, size=None, normalize=True)
    assert_close(ours_grid, theirs_grid, rtol=0.0, atol=NORM_ATOL, scale=1.0, tag=f"timm:pgc:grid:{tag}")
    ours_input = explainer.explain(x, targets, size="input", normalize=True)
    assert_close(ours_input, theirs_input, rtol=0.0, atol=NORM_ATOL, scale=1.0, tag=f"timm:pgc:input:{tag}")
    assert _hooks(model) == hooks_before, "hooks were left on the model"


def _pgc_vit_reshape(prefix: int, h: int, w: int):
    """pytorch-grad-cam's vit_reshape_transform, with timm's prefix count and grid spelled out."""
    def reshape(tensor):
        result = tensor[:, prefix:, :].reshape(tensor.size(0), h, w, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)
    return reshape


# ----------------------------------------------------------------------------------------------
# Layers


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("resnet50", {}, "layer4"),
        ("convnext_tiny", {}, "stages.3"),
        # pytorch-grad-cam's tutorial: target_layers = [model.blocks[-1].norm1]; vit_small has 12 blocks
        ("vit_small_patch16_224", {"img_size": 64}, "blocks.11.norm1"),
        ("vit_small_patch16_224", {"img_size": 64, "reg_tokens": 4}, "blocks.11.norm1"),
    ],
)
def test_default_layer(name, kwargs, expected):
    model = _model(name, **kwargs)
    assert i2x_timm.default_layer(model) == expected
    explainer = i2x_timm.explainer_for(model)
    assert explainer.layer_names == [expected] and explainer.method == "gradcam"
    # a DataParallel-style wrapper: the same layer, found inside it
    assert i2x_timm.default_layer(torch.nn.DataParallel(model)) == expected


# ----------------------------------------------------------------------------------------------
# CNNs: parity with pytorch-grad-cam


@pytest.mark.parametrize("name, layer", [("resnet50", "layer4"), ("convnext_tiny", "stages.3")])
def test_cnn_matches_pytorch_grad_cam(name, layer):
    model = _model(name)
    explainer = i2x_timm.explainer_for(model)
    assert explainer.reshape is None
    # 128 x 96 input, stride 32: a 4 x 3 grid (not square, so a transposed map would show)
    _assert_matches_pgc(explainer, model, layer, _x(128, 96), TARGETS, grid=(4, 3), tag=name)


# ----------------------------------------------------------------------------------------------
# ViTs: the reshape, and parity with pytorch-grad-cam


@pytest.mark.parametrize(
    "kwargs, prefix",
    [({}, 1), ({"reg_tokens": 4}, 5), ({"class_token": False, "global_pool": "avg"}, 0)],
    ids=["cls", "cls+4reg", "no-prefix"],
)
def test_vit_reshape_drops_exactly_the_prefix_tokens(kwargs, prefix):
    model = _model("vit_small_patch16_224", img_size=(32, 48), **kwargs)  # 2 x 3 patches of 16
    reshape = i2x_timm.vit_reshape(model)
    channels = 4
    patches = torch.arange(2 * 6 * channels, dtype=torch.float32).reshape(2, 6, channels)
    tokens = torch.cat([torch.full((2, prefix, channels), -1.0), patches], dim=1)  # prefix tokens: -1
    grid = reshape(tokens)
    assert grid.shape == (2, channels, 2, 3)
    for b in range(2):
        for row in range(2):
            for col in range(3):  # patch tokens are row-major over the 2 x 3 grid
                assert torch.equal(grid[b, :, row, col], patches[b, row * 3 + col])
    assert not bool((grid == -1).any())
    with pytest.raises(ValueError, match=rf"{prefix + 5} tokens, but {prefix} prefix \+ 2x3 patch tokens"):
        reshape(tokens[:, :-1])  # one patch token short


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 4}], ids=["cls", "cls+4reg"])
def test_vit_reshape_matches_timms_own_feature_maps(kwargs):
    """timm's forward_intermediates lays a block's patch tokens out as NCHW itself: the same grid."""
    model = _model("vit_small_patch16_224", img_size=(32, 48), **kwargs)
    x = _x(32, 48)
    seen = []
    handle = model.blocks[11].register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.no_grad():
        theirs = model.forward_intermediates(x, indices=[11], norm=False, output_fmt="NCHW", intermediates_only=True)
    handle.remove()
    assert theirs[0].shape == (2, 384, 2, 3)
    assert torch.equal(i2x_timm.vit_reshape(model)(seen[0]), theirs[0])


@pytest.mark.parametrize("kwargs, prefix", [({}, 1), ({"reg_tokens": 4}, 5)], ids=["cls", "cls+4reg"])
def test_vit_matches_pytorch_grad_cam(kwargs, prefix):
    model = _model("vit_small_patch16_224", img_size=(64, 96), **kwargs)  # 4 x 6 patches
    explainer = i2x_timm.explainer_for(model)
    _assert_matches_pgc(explainer, model, "blocks.11.norm1", _x(64, 96), TARGETS, grid=(4, 6),
                        reshape_transform=_pgc_vit_reshape(prefix, 4, 6), tag=f"vit+{prefix}")


def test_vit_dynamic_image_size_follows_the_input():
    model = _model("vit_small_patch16_224", img_size=64, dynamic_img_size=True)
    explainer = i2x_timm.explainer_for(model)
    try:
        # 48 x 80 is not the model's 64 x 64: a 3 x 5 patch grid, found from this forward
        _assert_matches_pgc(explainer, model, "blocks.11.norm1", _x(48, 80), TARGETS, grid=(3, 5),
                            reshape_transform=_pgc_vit_reshape(1, 3, 5), tag="vit-dynamic")
        assert explainer.explain(_x(32, 32), TARGETS, size=None).shape == (2, 2, 2)
    finally:
        explainer.reshape.remove()
    assert not model.patch_embed._forward_hooks


# ----------------------------------------------------------------------------------------------
# Swin (channels-last stages): reshape_for permutes


def test_swin_matches_pytorch_grad_cam():
    model = _model("swin_tiny_patch4_window7_224", img_size=64, window_size=2)  # stages 16, 8, 4, 2
    assert i2x_timm.default_layer(model) == "layers.3"
    explainer = i2x_timm.explainer_for(model)
    _assert_matches_pgc(explainer, model, "layers.3", _x(64, 64), TARGETS, grid=(2, 2),
                        reshape_transform=lambda t: t.permute(0, 3, 1, 2), tag="swin")


# ----------------------------------------------------------------------------------------------
# The tracker on a timm ResNet


def test_tracker_records_a_timm_resnet(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    images = torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(12) % 3
    layer = i2x_timm.default_layer(model)
    tracker = i2x.Tracker(model, layer, (images, labels), tmp_path / "run", schedule=[1, 2], recalibrate_bn=0,
                          batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in (1, 2):
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
        if step == 1:
            assert tracker.step(step)
    tracker.finish(2, prototypes={"n_prototypes": 2})
    store = i2x.RunStore.open(tmp_path / "run")
    assert store.finished_steps() == [1, 2] and store.final_step() == 2
    assert store.has("prototypes")
    # the final record is pytorch-grad-cam's raw GradCAM of the true class of the final model
    model.eval()
    theirs, _, _ = _pgc_maps(model, "layer4", images, labels.tolist())
    saved = store.load_checkpoint(2)
    assert int((theirs.amax(dim=(1, 2)) > 1e-4).sum()) >= 6, "too few non-zero maps for a meaningful comparison"
    assert_close(saved["saliency"].float(), theirs, rtol=1e-3, atol=1e-3, tag="timm:tracker")
    with torch.no_grad():
        assert_close(saved["probs"], torch.softmax(model(images), dim=1), rtol=1e-5, atol=1e-6,
                     tag="timm:tracker:probs")


def test_tracker_records_a_timm_vit_with_registers(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=3, img_size=32, reg_tokens=4)
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tracker = i2x.Tracker(model, i2x_timm.default_layer(model), (images, torch.arange(12) % 3), tmp_path / "run",
                          schedule=[1, 2], reshape=i2x_timm.reshape_for(model), batch_size=8)
    tracker.step(1)
    tracker.finish(2, prototypes={"n_prototypes": 2})
    store = i2x.RunStore.open(tmp_path / "run")
    assert store.finished_steps() == [1, 2] and store.has("prototypes")
    assert tuple(store.grid) == (2, 2)  # 32 / 16 patches a side: the register tokens were dropped
    assert store.load_checkpoint(2)["saliency"].shape == (12, 2, 2)


# ----------------------------------------------------------------------------------------------
# Bad input, and no timm import until used


def test_vit_reshape_rejects_a_cnn():
    with pytest.raises(TypeError, match=r"ResNet is not a timm Vision Transformer"):
        i2x_timm.vit_reshape(_model("resnet50"))
    with pytest.raises(TypeError, match=r"expected a timm model"):
        i2x_timm.vit_reshape("vit_small_patch16_224")


def test_wrong_image_size_and_unknown_family_are_clear_errors():
    model = _model("vit_small_patch16_224", img_size=(64, 96))
    reshape = i2x_timm.vit_reshape(model)
    with pytest.raises(ValueError, match=r"expected block tokens \[B, N, C\]"):
        reshape(torch.zeros(2, 384, 4, 6))
    with pytest.raises(ValueError, match=r"17 tokens, but 1 prefix \+ 4x6 patch tokens = 25 expected"):
        reshape(torch.zeros(2, 17, 384))
    with pytest.raises(ValueError, match=r"neither a timm ViT nor has timm's feature_info"):
        i2x_timm.default_layer(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


def test_importing_the_integration_does_not_import_timm():
    code = "import sys, i2x.integrations.timm; assert 'timm' not in sys.modules, 'timm was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
