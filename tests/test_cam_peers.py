"""i2x.explain.explainer.Explainer against the peers: captum's LayerGradCam (raw maps) and pytorch-grad-cam's
GradCAM / GradCAMPlusPlus / XGradCAM / LayerCAM / HiResCAM (normalised maps), on torchvision
resnet18, vgg11 and densenet121 with fixed random weights in eval mode.

Random weights make some (layer, class, image) maps all zero or near-constant (ReLU of a sum that is
negative almost everywhere), where min-max normalisation only amplifies rounding. The inputs and
classes below were chosen so that every compared map is not degenerate, and every test asserts
that before comparing (``assert_not_degenerate``), so a change of weights cannot make a comparison
vacuous.

Measured worst errors (float32, this machine; conftest prints them per tag, "peers:*"):
  raw maps vs captum:                0.09 of the tolerance (1e-5 |expected| + 1e-5 max|expected|),
                                     i.e. < 2e-6 of max|map|
  raw maps vs pytorch-grad-cam:      0.31 of the tolerance (< 6e-6 of max|map|; densenet121,
                                     1024 channels; max |diff| 9.5e-6 on gradcam++ maps ~3)
  normalised, on the layer's grid:   2.4e-6 absolute        (tolerance 2e-5)
  normalised, resized to the input:  2.4e-6 absolute        (tolerance 2e-5)
The raw differences are float32 summation order (numpy / captum / the compiled op over up to
1024 channels); normalising divides them by the map's range.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torchvision

from conftest import CAM_NORM_ATOL as NORM_ATOL, CAM_RAW_ATOL as RAW_ATOL, CAM_RAW_RTOL as RAW_RTOL, assert_close

from i2x.explain.explainer import Explainer

captum_attr = pytest.importorskip("captum.attr")
pgc = pytest.importorskip("pytorch_grad_cam")
pgc_targets = pytest.importorskip("pytorch_grad_cam.utils.model_targets")

NUM_CLASSES = 10

# model -> (input side, targets per image). Sides give grids of 4 x 4 (resnet18 layer4 at 100),
# 7 x 7 (vgg11 features.19 at 112) and 3 x 3 (densenet121 at 100).
SETUPS = {
    "resnet18": (100, [3, 1]),
    "vgg11": (112, [2, 5]),
    "densenet121": (100, [4, 8]),
}

PGC_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
}


@functools.lru_cache(maxsize=None)
def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES).eval()


@pytest.fixture
def setup(request):
    """(model, x, targets) for the model named by the test's ``model_name`` parameter."""
    name = request.node.callspec.params["model_name"]
    side, targets = SETUPS[name]
    model = _model(name)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    yield model, x, targets
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam runs loss.backward() on the shared model
    assert model.training is False


def assert_not_degenerate(raw: torch.Tensor) -> None:
    hi = raw.amax(dim=(1, 2))
    lo = raw.amin(dim=(1, 2))
    assert bool((hi > 1e-6).all()), f"degenerate maps (max {hi.tolist()})"
    assert bool((hi - lo > 1e-3 * hi).all()), f"near-constant maps (max {hi.tolist()}, min {lo.tolist()})"


def assert_no_hooks(model):
    leftover = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    assert not leftover, f"hooks left on {leftover}"


# ----------------------------------------------------------------------------------------------
# captum: raw GradCAM


@pytest.mark.parametrize(
    "model_name, layer",
    [
        ("resnet18", "layer4"),
        ("vgg11", "features.19"),  # the last conv's ReLU (in-place), 7 x 7 at 112
        ("vgg11", "features.18"),  # the last conv, followed by an in-place ReLU
        ("densenet121", "features.denseblock4"),
        ("densenet121", "features.norm5"),  # followed by F.relu(..., inplace=True) in forward()
    ],
)
def test_raw_gradcam_matches_captum(setup, model_name, layer):
    model, x, targets = setup
    module = model.get_submodule(layer)
    theirs = captum_attr.LayerGradCam(model, module).attribute(x, target=targets, relu_attributions=True)
    assert theirs.shape[:2] == (2, 1)
    theirs = theirs[:, 0].detach()
    assert_not_degenerate(theirs)
    ours = Explainer(model, layer).explain(x, targets, size=None, normalize=False)
    assert ours.shape == theirs.shape
    assert_close(ours, theirs, rtol=RAW_RTOL, atol=RAW_ATOL, tag=f"peers:captum:{model_name}")
    assert_no_hooks(model)


# ----------------------------------------------------------------------------------------------
# pytorch-grad-cam: normalised maps of the five methods
#
# What pytorch-grad-cam returns for one target layer: relu(cam) on the layer's grid, min-maxed
# with an eps (img - min) / (max + 1e-7), resized with cv2.resize (bilinear, half-pixel centres,
# float weights for float32 images: the samples of F.interpolate(align_corners=False)), and then
# min-maxed again by aggregate_multi_layers. Bilinear resizing commutes with an affine map of the
# values (its weights sum to 1), so that equals min-max(resize(relu(cam))) — i2x's order — up to
# the eps terms and cv2's rounding. Hence the input-size comparison below holds to ~1e-6.
#
# Several target layers (not compared here): pytorch-grad-cam min-maxes each layer's map on its
# own grid BEFORE resizing, averages, and min-maxes the average; i2x resizes each map, min-maxes
# it on the output grid, averages and min-maxes again. With one layer the second min-max hides
# the difference; with several, a resized map that does not reach its grid's extremes enters the
# average with a range below [0, 1] in pytorch-grad-cam and exactly [0, 1] in i2x.
#
# Layers: for vgg11 and densenet121 pytorch-grad-cam is compared at features.19 / denseblock4, not
# at features.18 / norm5. Those two are followed by an in-place ReLU, and pytorch-grad-cam keeps
# the layer's output tensor itself (detached, same storage), which the ReLU then overwrites: its
# gradcam / xgradcam maps there differ from captum's and from i2x's by up to the whole [0, 1]
# range (measured), while i2x matches captum at those layers (test above).


@pytest.mark.parametrize("method", list(PGC_METHODS))
@pytest.mark.parametrize(
    "model_name, layer",
    [("resnet18", "layer4"), ("vgg11", "features.19"), ("densenet121", "features.denseblock4")],
)
def test_maps_match_pytorch_grad_cam(setup, model_name, layer, method):
    model, x, targets = setup
    module = model.get_submodule(layer)
    cam_class = getattr(pgc, PGC_METHODS[method])
    pgc_targets_list = [pgc_targets.ClassifierOutputTarget(t) for t in targets]
    with cam_class(model=model, target_layers=[module]) as cam:
        theirs_input = cam(input_tensor=x, targets=pgc_targets_list)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        # their raw map, and their whole pipeline with the layer's grid as the "input" size
        theirs_raw = np.maximum(cam.get_cam_image(x, module, pgc_targets_list, acts, grads, False), 0)
        grid = tuple(theirs_raw.shape[-2:])
        theirs_grid = cam.aggregate_multi_layers(
            cam.compute_cam_per_layer(torch.empty(2, 3, *grid), pgc_targets_list, False)
        )
    assert_no_hooks(model)
    theirs_raw = torch.from_numpy(np.ascontiguousarray(theirs_raw)).float()
    assert_not_degenerate(theirs_raw)

    explainer = Explainer(model, layer, method=method)
    ours_raw = explainer.explain(x, targets, size=None, normalize=False)
    assert_close(ours_raw, theirs_raw, rtol=RAW_RTOL, atol=RAW_ATOL, tag=f"peers:pgc:raw:{model_name}")

    ours_grid = explainer.explain(x, targets, size=None, normalize=True)
    assert theirs_grid.shape == (2, *grid)
    assert_close(ours_grid, torch.from_numpy(theirs_grid), rtol=0.0, atol=NORM_ATOL, scale=1.0,
                 tag=f"peers:pgc:grid:{model_name}")

    ours_input = explainer.explain(x, targets, size="input", normalize=True)
    assert theirs_input.shape == (2, *x.shape[-2:]) and ours_input.shape == theirs_input.shape
    assert_close(ours_input, torch.from_numpy(theirs_input), rtol=0.0, atol=NORM_ATOL, scale=1.0,
                 tag=f"peers:pgc:input:{model_name}")
    # normalised maps span [0, 1] (the peers' eps leaves them a hair below 1)
    assert torch.all(ours_input.amax(dim=(1, 2)) == 1.0) and torch.all(ours_input.amin(dim=(1, 2)) == 0.0)
