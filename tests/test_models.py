"""Tests for i2x.models: shapes, the target layer's grid, parameter counts, init, the ResNet-50 variant.

Truths: grid sizes from the strides (ceil(H / 4) at layer3), parameter counts written out layer by
layer, the identity a zero-initialised residual block must compute, and torchvision's ResNet-50.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from i2x.models import MODEL_NAMES, BasicBlock, SmallResNet, build_model, default_layer


def grid_of(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Size:
    """The shape of ``layer``'s output for input ``x``, captured by a forward hook."""
    seen = {}

    def hook(module, inputs, output):  # returns None: the output is left as it is
        seen["shape"] = output.shape

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen["shape"]


@pytest.mark.parametrize("size, grid", [(28, 7), (32, 8)])
@pytest.mark.parametrize("channels", [1, 3])
def test_small_resnet_layer3_keeps_a_grid(size, grid, channels):
    torch.manual_seed(0)
    model, layer = build_model("small-resnet", num_classes=10, in_channels=channels)
    assert layer == "layer3" and default_layer("small-resnet") == "layer3"
    x = torch.randn(2, channels, size, size)
    assert grid_of(model, layer, x) == (2, 64, grid, grid)
    assert model(x).shape == (2, 10)


def test_small_resnet_four_stages_layer4():
    model, layer = build_model("small-resnet", 7, in_channels=3, widths=(8, 16, 32, 48))
    assert layer == "layer4" == default_layer("small-resnet", widths=(8, 16, 32, 48))
    x = torch.randn(2, 3, 32, 32)
    assert grid_of(model, "layer4", x) == (2, 48, 4, 4)
    assert grid_of(model, "layer3", x) == (2, 32, 8, 8)
    assert grid_of(model, "layer4", torch.randn(1, 3, 28, 28)) == (1, 48, 4, 4)
    assert model(x).shape == (2, 7)


def test_forward_is_pool_and_linear_over_the_last_stage():
    torch.manual_seed(0)
    model = SmallResNet(num_classes=5).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    torch.testing.assert_close(logits, feats.mean(dim=(2, 3)) @ model.fc.weight.T + model.fc.bias)


def conv_bn(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + 2 * cout  # bias-free conv + BN gamma/beta


def test_parameter_count_written_out():
    model = SmallResNet(num_classes=10, in_channels=1)
    stem = conv_bn(1, 16, 3)
    layer1 = 2 * conv_bn(16, 16, 3)
    layer2 = conv_bn(16, 32, 3) + conv_bn(32, 32, 3) + conv_bn(16, 32, 1)
    layer3 = conv_bn(32, 64, 3) + conv_bn(64, 64, 3) + conv_bn(32, 64, 1)
    fc = 64 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == stem + layer1 + layer2 + layer3 + fc == 77754
    deeper = SmallResNet(blocks_per_stage=2)
    assert [len(getattr(deeper, f"layer{i}")) for i in (1, 2, 3)] == [2, 2, 2]
    extra = 2 * conv_bn(16, 16, 3) + 2 * conv_bn(32, 32, 3) + 2 * conv_bn(64, 64, 3)
    assert sum(p.numel() for p in deeper.parameters()) == 77754 + extra


def test_shortcut_only_where_the_shape_changes():
    model = SmallResNet()
    assert isinstance(model.layer1[0].shortcut, torch.nn.Identity)
    assert model.layer2[0].shortcut[0].stride == (2, 2) and model.layer3[0].shortcut[0].stride == (2, 2)
    assert [m.stride for m in (model.stem[0], model.layer1[0].conv1, model.layer2[0].conv1)] == [(1, 1), (1, 1), (2, 2)]


def test_zero_init_residual_block_is_relu():
    # With the last BN's gamma at 0 (and beta 0) the residual branch outputs 0, so an identity
    # block computes relu(x).
    torch.manual_seed(0)
    model = SmallResNet(zero_init_residual=True)
    x = torch.randn(4, 16, 9, 9)
    torch.testing.assert_close(model.layer1[0](x), F.relu(x))
    plain = BasicBlock(16, 16)
    assert not torch.allclose(plain(x), F.relu(x))


def test_init_is_deterministic_given_the_seed():
    def weights(seed):
        torch.manual_seed(seed)
        return build_model("small-resnet", 10)[0].state_dict()

    a, b, c = weights(3), weights(3), weights(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["stem.0.weight"], c["stem.0.weight"])
    # He init (fan_out): std of a 3x3 conv with 64 outputs is sqrt(2 / (64 * 9)).
    w = a["layer3.0.conv2.weight"]
    assert abs(w.std().item() / (2 / (64 * 9)) ** 0.5 - 1) < 0.05


def test_small_resnet_learns_a_fixed_batch():
    torch.manual_seed(0)
    model, _ = build_model("small-resnet", 4)
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(16):  # 16 random images memorised: the loss falls from 1.47 to ~0.15
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_resnet50_one_channel():
    import torchvision

    torch.manual_seed(0)
    model, layer = build_model("resnet50", num_classes=7, in_channels=1)
    assert isinstance(model, torchvision.models.ResNet) and layer == "layer4" == default_layer("resnet50")
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert model.fc.out_features == 7
    model.eval()
    x = torch.randn(2, 1, 64, 64)
    assert grid_of(model, layer, x) == (2, 2048, 2, 2)  # 64 / 32
    with torch.no_grad():
        assert model(x).shape == (2, 7)


def test_resnet50_three_channels_keeps_torchvision_stem_and_small_input_keeps_a_grid():
    model, _ = build_model("resnet50", num_classes=10, in_channels=3)
    assert model.conv1.in_channels == 3 and isinstance(model.maxpool, torch.nn.MaxPool2d)
    small, layer = build_model("resnet50", num_classes=10, in_channels=1, small_input=True)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert grid_of(small.eval(), layer, torch.randn(1, 1, 28, 28)) == (1, 2048, 4, 4)


def test_unknown_names_and_bad_options():
    for fn in (lambda n: build_model(n, 10), default_layer):
        with pytest.raises(ValueError) as info:
            fn("vgg16")
        assert all(name in str(info.value) for name in MODEL_NAMES)
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        build_model("resnet-50", 10)
    with pytest.raises(TypeError, match="small_input"):
        build_model("small-resnet", 10, small_input=True)
    with pytest.raises(ValueError, match="widths"):
        build_model("small-resnet", 10, widths=(16, 32))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small-resnet", 0)
    with pytest.raises(TypeError, match="blocks_per_stage"):
        SmallResNet(blocks_per_stage=1.0)
