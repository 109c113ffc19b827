"""``i2x.apps.bench`` / ``i2x bench``: the table's arithmetic, its rows, its errors, and that the
explain row computes what captum computes (parity on a tiny model; no timing is asserted).

Truths: the ratios are recomputed here from the recorded times; captum's LayerGradCam is called
here directly; the peak-memory column is checked against a model whose forward allocates a known
amount.
"""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from i2x.apps import bench as B
from i2x.cli import main

HAS_CAPTUM = importlib.util.find_spec("captum") is not None
HAS_GRAD_CAM = importlib.util.find_spec("pytorch_grad_cam") is not None
FAST = dict(batch=2, size=32, repeats=2, warmup=1)


class TinyNet(nn.Module):
    """conv - ReLU - conv (``layer``, 16 x 16 at 32 px) - ReLU - global pool - linear."""

    def __init__(self, classes: int = 5, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 6, 3, stride=2, padding=1)
        self.layer = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        h = torch.relu(self.layer(torch.relu(self.conv(x))))
        return self.fc(h.mean(dim=(2, 3)))


class HungryNet(TinyNet):
    """TinyNet whose forward also fills (and drops) a 96 MiB buffer: a known peak."""

    def forward(self, x):
        buffer = torch.ones(96 << 18)  # 96 MiB of float32, every page written
        return super().forward(x) + 0 * buffer[0]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


def gray_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet(classes=3, channels=1)


def hungry_model() -> nn.Module:
    torch.manual_seed(0)
    return HungryNet()


def not_a_model():
    return "a string"


SPEC = f"{__name__}:tiny_model"


@pytest.fixture(scope="module")
def result():
    return B.bench(SPEC, **FAST)


def test_ratios_are_the_row_medians_over_the_baseline(result):
    rows = {r["name"]: r for r in result["rows"]}
    for r in result["rows"]:
        assert len(r["times_ms"]) == FAST["repeats"]
        assert r["median_ms"] == pytest.approx(statistics.median(r["times_ms"]), rel=1e-12)
        assert r["min_ms"] == pytest.approx(min(r["times_ms"]), rel=1e-12)
        expected_baseline = B.TRAIN if r["name"] in (B.TRAIN, B.TRAIN_I2X) else B.FORWARD
        assert r["baseline"] == expected_baseline
        assert r["group"] == ("training" if expected_baseline == B.TRAIN else "explain")
        assert r["ratio"] == pytest.approx(r["median_ms"] / rows[expected_baseline]["median_ms"], rel=1e-12)
    assert rows[B.FORWARD]["ratio"] == 1.0 and rows[B.TRAIN]["ratio"] == 1.0
    assert {B.FORWARD, B.I2X_EXPLAIN, B.TRAIN, B.TRAIN_I2X} <= set(rows)


def test_result_records_the_setup_and_the_machine(result):
    assert result["model_source"] == "factory"
    # No layer4: the dry run finds the last 4-D output larger than 1x1, TinyNet's `layer`.
    assert result["layer"] == "layer" and "dry run" in result["layer_source"]
    assert result["grid"] == [16, 16] and result["input"] == [2, 3, 32, 32] and result["num_classes"] == 5
    assert result["dtype"] == "float32" and result["device"] == "cpu"
    assert result["parameters"] == sum(p.numel() for p in tiny_model().parameters())
    m = result["machine"]
    assert m["torch"] == torch.__version__ and m["torch_threads"] == torch.get_num_threads()
    assert m["i2x"]["version"] and m["cpu"]
    assert json.loads(json.dumps(result)) == result
    table = B.format_table(result)
    assert all(f"| {r['name']} |" in table for r in result["rows"])


def test_input_channels_follow_the_first_conv():
    r = B.bench(f"{__name__}:gray_model", captum=False, **FAST)
    assert r["input"] == [2, 1, 32, 32] and r["num_classes"] == 3


def test_third_party_rows_present_iff_installed(result):
    names = [r["name"] for r in result["rows"]]
    assert (B.CAPTUM in names) == HAS_CAPTUM
    assert (B.GRAD_CAM in names) == HAS_GRAD_CAM
    if not HAS_CAPTUM:
        assert "not installed" in result["skipped"][B.CAPTUM]
    off = B.bench(SPEC, captum=False, **FAST)
    assert B.CAPTUM not in [r["name"] for r in off["rows"]] and B.CAPTUM in off["skipped"]
    assert B.GRAD_CAM not in [r["name"] for r in off["rows"]]


def test_a_module_is_copied_not_changed():
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = B.bench(model, captum=False, **FAST)
    assert r["model_source"] == "module" and r["model"] == "TinyNet"
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(not HAS_CAPTUM, reason="captum is not installed")
def test_i2x_maps_match_captum_layer_gradcam():
    from captum.attr import LayerGradCam

    model = tiny_model().eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 3, 1, 4])
    fns, _ = B.explain_contenders(model, "layer", "gradcam")
    ours = fns[B.I2X_EXPLAIN](x, targets)
    # captum computed here: GradCAM with ReLU at the layer, bilinear upsample, per-image min-max.
    attr = LayerGradCam(model, model.layer).attribute(x, target=targets, relu_attributions=True).detach()
    up = F.interpolate(attr, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    truth = (up - lo) / (hi - lo)
    assert ours.shape == (4, 32, 32)
    torch.testing.assert_close(ours, truth, atol=1e-5, rtol=1e-4)
    # The table's captum row times exactly this computation.
    torch.testing.assert_close(fns[B.CAPTUM](x, targets), truth, atol=1e-6, rtol=1e-6)


def test_peak_memory_sees_a_known_allocation():
    works, how = B.cpu_memory_check()
    if not works:
        pytest.skip(f"peak resident memory cannot be measured here: {how}")
    r = B.bench(f"{__name__}:hungry_model", captum=False, batch=2, size=32, repeats=1, warmup=1)
    assert r["memory"]["available"] and "VmHWM" in r["memory"]["method"]
    for row in r["rows"]:  # every row runs the forward, which fills 96 MiB
        assert 90 <= row["peak_mib"] < 400, row


@pytest.mark.parametrize("model, message", [
    ("resnet19", "did you mean 'resnet18'"),
    ("resnet19", "list_models"),
    ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
    (f"{__name__}:missing_factory", "has no attribute 'missing_factory'"),
    ("a:b:c", "expected 'module:factory'"),
    (":tiny_model", "expected 'module:factory'"),
])
def test_bad_model_names(model, message):
    with pytest.raises(ValueError, match="model") as info:
        B.bench(model, **FAST)
    assert message in str(info.value)


def test_factory_must_return_a_module():
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        B.bench(f"{__name__}:not_a_model", **FAST)
    with pytest.raises(TypeError, match="not callable"):
        B.bench(f"{__name__}:SPEC", **FAST)


@pytest.mark.parametrize("options, name", [
    ({"dtype": "float8"}, "dtype"),
    ({"dtype": "float16"}, "dtype: float16 needs CUDA"),
    ({"batch": 0}, "batch"),
    ({"size": 0}, "size"),
    ({"size": 1}, "size"),  # TinyNet's layer is 1x1 at 1 px: nothing to localise
    ({"repeats": 0}, "repeats"),
    ({"warmup": -1}, "warmup"),
    ({"method": "gradcam+++"}, "method"),
    ({"device": "tpu"}, "device"),
    ({"layer": "layerr"}, "layer 'layerr'"),
    ({"num_classes": 10}, "num_classes"),  # a factory model has its own head
])
def test_bad_arguments_name_themselves(options, name):
    with pytest.raises(ValueError, match=name):
        B.bench(SPEC, **{**FAST, **options})


def test_too_small_for_the_torchvision_layer():
    with pytest.raises(ValueError, match=r"size: at 32 px layer 'layer4' is a 1x1 grid"):
        B.bench("resnet18", batch=1, size=32, repeats=1, captum=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda():
    with pytest.raises(ValueError, match="device: 'cuda' requested but CUDA is not available"):
        B.bench(SPEC, device="cuda", **FAST)


def test_bfloat16_on_cpu_runs_under_autocast():
    r = B.bench(SPEC, dtype="bf16", captum=False, **FAST)
    assert r["dtype"] == "bfloat16" and "autocast" in r["dtype_meaning"]


# ----------------------------------------------------------------------------------------------
# The command


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_bench_json(capsys):
    rc, stdout, err = _run(["bench", SPEC, "--batch", "2", "--size", "32", "--repeats", "2", "--no-captum", "--json"],
                           capsys)
    assert rc == 0, err
    out = json.loads(stdout)
    assert out["input"] == [2, 3, 32, 32] and out["repeats"] == 2
    assert B.CAPTUM not in [r["name"] for r in out["rows"]]


def test_cli_bench_table(capsys):
    rc, out, err = _run(["bench", SPEC, "--batch", "1", "--size", "32", "--repeats", "1", "--no-captum"], capsys)
    assert rc == 0, err
    assert out.startswith("i2x bench: ") and f"| {B.TRAIN_I2X} |" in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "resnet19"], "did you mean 'resnet18'"),
    (["bench", SPEC, "--dtype", "float8"], "dtype"),
    (["bench", SPEC, "--size", "1"], "size"),
])
def test_cli_bench_input_errors_exit_2(argv, message, capsys):
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and err.startswith("i2x bench: error:") and message in err and "Traceback" not in err


def test_cli_bench_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, argparse; from i2x.cli import bench; p = argparse.ArgumentParser(); "
            "bench.register(p.add_subparsers()); assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
