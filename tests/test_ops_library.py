"""Registration-level tests: torch.library.opcheck (schema, fake kernels, autograd registration,
AOT dispatch), torch.compile(fullgraph=True) of the ops chained as the package uses them, the
build description, and the refusal to load against another torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import assert_close, randn, rand

import i2x
from i2x import ops

# --------------------------------------------------------------------------------------------
# opcheck


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _cam_args(method, relu, dtype=torch.float32, grad=False, channels_last=False):
    gen = _g(1)
    a = randn((2, 3, 4, 5), gen, dtype).abs()
    g = randn((2, 3, 4, 5), gen, dtype)
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
    if grad:
        a.requires_grad_()
        g.requires_grad_()
    return (a, g, method, relu)


OPCHECK_SAMPLES = [
    # cam: every method, with and without grad, defaults (gradcam, relu=True) included
    ("cam-gradcam-default", torch.ops.i2x.cam.default, lambda: _cam_args("gradcam", True, grad=True)),
    ("cam-gradcam++-relu", torch.ops.i2x.cam.default, lambda: _cam_args("gradcam++", True, grad=True)),
    ("cam-xgradcam-norelu", torch.ops.i2x.cam.default, lambda: _cam_args("xgradcam", False, grad=True)),
    ("cam-layercam-norelu-f64-cl", torch.ops.i2x.cam.default, lambda: _cam_args("layercam", False, torch.float64, True, True)),
    ("cam-hirescam-norelu-nograd", torch.ops.i2x.cam.default, lambda: _cam_args("hirescam", False)),
    ("cam-mixed-f16-f32", torch.ops.i2x.cam.default,
     lambda: (randn((1, 2, 3, 3), _g(2), torch.float16), randn((1, 2, 3, 3), _g(3), torch.float32), "gradcam", False)),
    # upsample_normalize
    ("upsample-normalize-grad", torch.ops.i2x.upsample_normalize.default,
     lambda: (randn((2, 3, 4), _g(4), torch.float32).requires_grad_(), [7, 9], True)),
    ("upsample-raw-grad", torch.ops.i2x.upsample_normalize.default,
     lambda: (randn((2, 3, 4), _g(5), torch.float64).requires_grad_(), [2, 2], False)),
    ("upsample-raw-bf16", torch.ops.i2x.upsample_normalize.default,
     lambda: (randn((1, 5, 5), _g(6), torch.bfloat16), [3, 8], False)),
    # prototype_assign (not differentiable)
    ("assign-rows", torch.ops.i2x.prototype_assign.default,
     lambda: (randn((20, 4), _g(7)), randn((5, 4), _g(8)), None, None)),
    ("assign-spatial-pca", torch.ops.i2x.prototype_assign.default,
     lambda: (randn((2, 4, 3, 5), _g(9)), randn((5, 2), _g(10)), randn((4,), _g(11)), randn((4, 2), _g(12)))),
    ("assign-mixed-f16-f64", torch.ops.i2x.prototype_assign.default,
     lambda: (randn((2, 4, 3, 3), _g(13), torch.float16), randn((3, 4), _g(14), torch.float64), None, None)),
    # prototype_pool
    ("pool-grad", torch.ops.i2x.prototype_pool.default,
     lambda: (randn((2, 3, 4), _g(15)).requires_grad_(), torch.randint(0, 4, (2, 3, 4), generator=_g(16)), 6)),
    ("pool-int32-f64", torch.ops.i2x.prototype_pool.default,
     lambda: (randn((1, 4, 4), _g(17), torch.float64).requires_grad_(), torch.randint(0, 2, (1, 4, 4), generator=_g(18), dtype=torch.int32), 2)),
    ("pool-nograd-f16", torch.ops.i2x.prototype_pool.default,
     lambda: (randn((2, 2, 2), _g(19), torch.float16), torch.zeros(2, 2, 2, dtype=torch.int64), 1)),
    # saliency_pool
    ("saliency-pool-grad", torch.ops.i2x.saliency_pool.default,
     lambda: (randn((2, 3, 4, 5), _g(20)).requires_grad_(), rand((2, 4, 5), _g(21), low=0.1).requires_grad_())),
    ("saliency-pool-f64-features-only", torch.ops.i2x.saliency_pool.default,
     lambda: (randn((1, 2, 3, 3), _g(22), torch.float64).requires_grad_(), rand((1, 3, 3), _g(23), torch.float64))),
    ("saliency-pool-mixed-nograd", torch.ops.i2x.saliency_pool.default,
     lambda: (randn((2, 2, 3, 3), _g(24), torch.bfloat16), rand((2, 3, 3), _g(25), torch.float32))),
]


@pytest.mark.parametrize("op,make_args", [s[1:] for s in OPCHECK_SAMPLES], ids=[s[0] for s in OPCHECK_SAMPLES])
def test_opcheck(op, make_args):
    torch.library.opcheck(op, make_args())


def test_opcheck_covers_every_op():
    covered = {s[1].name() for s in OPCHECK_SAMPLES}
    assert covered == {f"i2x::{n}" for n in ("cam", "upsample_normalize", "prototype_assign", "prototype_pool", "saliency_pool")}


# --------------------------------------------------------------------------------------------
# torch.compile


K = 6


def _pipeline_inputs(batch=2, grad=False):
    gen = _g(100 + batch)
    acts = randn((batch, 8, 5, 6), gen).abs()
    grads = randn((batch, 8, 5, 6), gen)
    feats = randn((batch, 8, 5, 6), gen)
    cents = randn((K, 3), gen)
    mean = randn((8,), gen)
    comps = randn((8, 3), gen) / 3
    if grad:
        acts.requires_grad_()
        grads.requires_grad_()
        feats.requires_grad_()
    return acts, grads, feats, cents, mean, comps


def _make_pipeline(relu: bool, normalize: bool):
    def pipeline(acts, grads, feats, cents, mean, comps):
        m = ops.cam(acts, grads, "gradcam++", relu=relu)
        heat = ops.upsample_normalize(m, (16, 20), normalize=normalize)
        assignment = ops.prototype_assign(feats.detach(), cents, mean, comps)
        intensity, counts = ops.prototype_pool(m, assignment, K)
        pooled = ops.saliency_pool(feats, m.abs() + 0.1)
        return heat, assignment, intensity, counts, pooled

    return pipeline


def _compare(got, want):
    for x, y in zip(got, want):
        if x.dtype.is_floating_point:
            assert_close(x, y, tag="compile")
        else:
            assert torch.equal(x, y)


# relu=True / normalize=True are the ops' defaults and the common call.
VARIANTS = [pytest.param(True, True, id="relu-normalize"), pytest.param(False, False, id="norelu-raw")]


@pytest.mark.parametrize("relu,normalize", VARIANTS)
def test_compile_aot_eager_fullgraph(relu, normalize):
    torch._dynamo.reset()
    pipeline = _make_pipeline(relu, normalize)
    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=True)
    inputs = _pipeline_inputs(grad=True)
    want = pipeline(*inputs)
    got = compiled(*inputs)
    _compare(got, want)
    # backward through the compiled graph
    def loss(outs):
        heat, _, intensity, _, pooled = outs
        return heat.pow(2).sum() + intensity.sum() + pooled.pow(2).sum()

    wrt = inputs[:3]
    g_want = torch.autograd.grad(loss(pipeline(*inputs)), wrt)
    g_got = torch.autograd.grad(loss(compiled(*inputs)), wrt)
    _compare(g_got, g_want)


@pytest.mark.parametrize("relu,normalize", VARIANTS)
def test_compile_dynamic_batch(relu, normalize):
    torch._dynamo.reset()
    pipeline = _make_pipeline(relu, normalize)
    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (2, 3, 1):
        inputs = _pipeline_inputs(batch)
        _compare(compiled(*inputs), pipeline(*inputs))


@pytest.mark.parametrize("relu,normalize", VARIANTS)
def test_compile_dynamic_batch_backward(relu, normalize):
    """Backward through a graph compiled with symbolic shapes (one compile for all batch sizes)."""
    torch._dynamo.reset()
    pipeline = _make_pipeline(relu, normalize)
    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=True, dynamic=True)

    def loss(outs):
        heat, _, intensity, _, pooled = outs
        return heat.pow(2).sum() + intensity.sum() + pooled.pow(2).sum()

    for batch in (2, 3):
        inputs = _pipeline_inputs(batch, grad=True)
        g_got = torch.autograd.grad(loss(compiled(*inputs)), inputs[:3])
        g_want = torch.autograd.grad(loss(pipeline(*inputs)), inputs[:3])
        _compare(g_got, g_want)


@pytest.mark.slow
@pytest.mark.parametrize("relu,normalize", VARIANTS)
def test_compile_inductor_fullgraph(relu, normalize):
    """Inductor compiles the surrounding torch code (C++ codegen on this CPU machine: ~30 s cold,
    a few seconds with a warm cache). Forward only, to keep it short."""
    torch._dynamo.reset()
    pipeline = _make_pipeline(relu, normalize)
    compiled = torch.compile(pipeline, fullgraph=True)
    inputs = _pipeline_inputs()
    start = time.perf_counter()
    got = compiled(*inputs)
    elapsed = time.perf_counter() - start
    _compare(got, pipeline(*inputs))
    assert elapsed < 120, f"inductor took {elapsed:.0f} s"


# --------------------------------------------------------------------------------------------
# build_info and the torch-version guard


def test_build_info():
    info = i2x.build_info()
    assert isinstance(info, dict)
    for key in ("version", "torch_version", "cuda", "cuda_archs", "openmp", "aten_threads"):
        assert key in info, key
    assert info["version"] == i2x.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], str)
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["aten_threads"], int) and info["aten_threads"] >= 1
    assert info["aten_threads"] == torch.get_num_threads()
    if not info["cuda"]:
        assert info["cuda_archs"] == ""
    else:
        assert info["cuda_archs"] and all(a.strip().isdigit() for a in info["cuda_archs"].split(","))


def test_build_info_follows_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert i2x.build_info()["aten_threads"] == 1
    finally:
        torch.set_num_threads(before)
    assert i2x.build_info()["aten_threads"] == before


def _run_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def test_import_refuses_other_torch_version(tmp_path):
    proc = _run_python(
        """
        import torch
        real = torch.__version__
        torch.__version__ = "1.0.0+fake"
        try:
            import i2x
        except ImportError as exc:
            print("IMPORTERROR", real)
            print(exc)
        else:
            print("IMPORTED")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("IMPORTERROR"), out + proc.stderr[-2000:]
    real = out.splitlines()[0].split(" ", 1)[1]
    message = out.split("\n", 1)[1]
    assert "1.0.0+fake" in message and real in message, message
    assert real == torch.__version__


def test_import_in_fresh_process_registers_ops(tmp_path):
    """The control for the test above: the same subprocess set-up imports fine and has the ops."""
    proc = _run_python(
        """
        import torch, i2x
        print(sorted(n for n in ("cam", "upsample_normalize", "prototype_assign", "prototype_pool", "saliency_pool")
                     if hasattr(torch.ops.i2x, n)))
        print(i2x.__file__)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'cam'" in proc.stdout and "'saliency_pool'" in proc.stdout and "'prototype_pool'" in proc.stdout
