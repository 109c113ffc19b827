"""The wheel and the sdist, installed the way a user installs them.

`pip wheel --no-build-isolation --no-deps .` is built from this checkout and installed, with its
dependencies, into a fresh virtual environment that holds only torch, torchvision and what those
two require. There, from a folder outside the source tree, `i2x info` must report the build and a
small explain must equal a plain-torch GradCAM. The sdist (`python -m build --sdist`) is checked for
its contents and metadata, and a wheel built from it must pass the same check.

torch and torchvision are linked into the fresh environment's site-packages from the test
environment (each distribution's top-level folders and its .dist-info) instead of being installed
again: the same files at the same place relative to i2x (its RPATH is ``$ORIGIN/../torch/lib``),
seen by pip as installed, without copying 5.5 GB.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from conftest import CAM_RAW_ATOL, CAM_RAW_RTOL, REPO

TORCH_SERIES = ".".join(torch.__version__.split("+")[0].split(".")[:2])
PIP = ("-m", "pip", "--disable-pip-version-check")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(cmd, cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {done.returncode}\n"
                             f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}")
    return done


def _requirement_closure(roots: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions of ``roots`` and, recursively, of what they require (markers
    evaluated for this interpreter, extras not taken)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = _canonical(todo.pop())
        if name in found:
            continue
        dist = importlib.metadata.distribution(name)
        found[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def _site_packages(env: Path) -> Path:
    return next(env.glob("lib/python*/site-packages"))


def _link_distributions(dists, site: Path) -> list[str]:
    present = {_canonical(d.metadata["Name"]) for d in importlib.metadata.distributions(path=[str(site)])}
    linked = []
    for name, dist in sorted(dists.items()):
        if name in present:  # pip and setuptools of the new venv itself
            continue
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops - {"__pycache__"}):
            if top.endswith(".pth"):
                continue
            link = site / top
            if not link.exists():  # namespace folders (nvidia/, cuda/) are shared by several
                link.symlink_to(base / top)
        linked.append(name)
    return linked


def _fake_wheel(folder: Path, name: str, version: str) -> Path:
    """A pure-Python wheel with nothing in it but its metadata: a stand-in for another torch."""
    dist_info = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    files = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: i2x-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for n, text in files.items():
            zf.writestr(n, text)
        zf.writestr(f"{dist_info}/RECORD", record)
    return path


def _only_wheel(folder: Path) -> Path:
    wheels = sorted(folder.glob("i2x-*.whl"))
    assert len(wheels) == 1, f"expected one i2x wheel in {folder}, found {[w.name for w in wheels]}"
    return wheels[0]


def _wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return zf.read(name).decode()


def _torch_requirements(metadata: str) -> list[str]:
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
            if line.startswith("Requires-Dist:")]
    return [str(r) for r in reqs if _canonical(r.name) == "torch" and r.marker is None]


# --- fixtures: one fresh venv, the wheel, the sdist and the wheel built from it ----------------------

@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("fresh") / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    linked = _link_distributions(_requirement_closure(["torch", "torchvision"]), _site_packages(env))
    assert {"torch", "torchvision"} <= set(linked)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, *PIP, "wheel", "-q", "--no-build-isolation", "--no-deps", REPO, "-w", out], cwd=out)
    return _only_wheel(out)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "-m", "build", "--sdist", "-o", out, REPO], cwd=out)
    (archive,) = sorted(out.glob("i2x-*.tar.gz"))
    return archive


@pytest.fixture(scope="module")
def wheel_from_sdist(sdist, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel-from-sdist")
    with tarfile.open(sdist) as tf:
        tf.extractall(out / "src", filter="data")
    (source,) = (out / "src").iterdir()
    _run([sys.executable, *PIP, "wheel", "-q", "--no-build-isolation", "--no-deps", source, "-w", out / "dist"],
         cwd=out)
    return _only_wheel(out / "dist")


SMALL_EXPLAIN = textwrap.dedent("""
    import json, torch, torchvision, i2x
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    targets = [1, 3]
    maps = i2x.Explainer(model, "layer4").explain(x, targets=targets, size=None, normalize=False)
    # the reference: plain-torch GradCAM at the same layer
    seen = {}
    hook = model.layer4.register_forward_hook(lambda module, inputs, output: seen.update(a=output))
    logits = model(x)
    hook.remove()
    score = logits[torch.arange(2), torch.tensor(targets)].sum()
    (grad,) = torch.autograd.grad(score, seen["a"])
    ref = torch.relu((grad.mean((2, 3), keepdim=True) * seen["a"]).sum(1)).detach()
    print(json.dumps({"file": i2x.__file__, "shape": list(maps.shape),
                      "diff": (maps - ref).abs().max().item(), "ref_max": ref.abs().max().item()}))
""")


def _check_installed_wheel(env: Path, wheel: Path, workdir: Path) -> None:
    python = env / "bin" / "python"
    # --force-reinstall --no-deps only replaces i2x; the first install brings its dependencies
    _run([python, *PIP, "install", "-q", wheel], cwd=workdir)
    _run([python, *PIP, "install", "-q", "--force-reinstall", "--no-deps", wheel], cwd=workdir)

    info = json.loads(_run([env / "bin" / "i2x", "info", "--json"], cwd=workdir).stdout)
    assert info["version"] == importlib.metadata.version("i2x")
    assert info["torch_version"] == torch.__version__
    assert info["cuda"] is False

    (workdir / "explain_small.py").write_text(SMALL_EXPLAIN)
    result = json.loads(_run([python, "explain_small.py"], cwd=workdir).stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve().is_relative_to(_site_packages(env).resolve()), result["file"]
    assert not Path(result["file"]).resolve().is_relative_to(REPO)
    assert result["shape"] == [2, 2, 2]  # resnet18's layer4 grid at 64 px
    assert result["ref_max"] > 0
    assert result["diff"] <= CAM_RAW_RTOL * result["ref_max"] + CAM_RAW_ATOL * result["ref_max"], result


# --- the wheel --------------------------------------------------------------------------------------

def test_wheel_metadata_pins_the_torch_series_it_was_built_against(wheel):
    assert _torch_requirements(_wheel_metadata(wheel)) == [f"torch=={TORCH_SERIES}.*"]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        config = zf.read("i2x/_build_config.py").decode()
    assert any(re.fullmatch(r"i2x/_C\..*\.so", n) for n in names), names
    assert not any(n.startswith(("build_support/", "tests/")) or n.endswith(".py.in") for n in names)
    assert f'TORCH_VERSION = "{torch.__version__}"' in config


def test_wheel_works_in_a_fresh_venv_with_only_torch_and_torchvision(fresh_venv, wheel, tmp_path):
    _check_installed_wheel(fresh_venv, wheel, tmp_path)


def test_pip_refuses_the_wheel_beside_another_torch(fresh_venv, wheel, tmp_path):
    python = fresh_venv / "bin" / "python"
    _run([python, *PIP, "install", "-q", wheel], cwd=tmp_path)  # its dependencies, so --no-index resolves
    major, minor = (int(p) for p in TORCH_SERIES.split("."))
    other = f"{major}.{minor - 1}.0" if minor > 0 else f"{major - 1}.99.0"
    links = tmp_path / "links"
    links.mkdir()
    _fake_wheel(links, "torch", other)
    offline = ["--dry-run", "--no-index", "--find-links", links]
    # control: beside the torch it was built against, pip plans i2x alone
    fine = _run([python, *PIP, "install", *offline, "--force-reinstall", "--no-deps", wheel], cwd=tmp_path)
    assert "Would install i2x" in fine.stdout
    refused = _run([python, *PIP, "install", *offline, wheel, f"torch=={other}"], cwd=tmp_path, check=False)
    assert refused.returncode != 0, refused.stdout
    said = refused.stdout + refused.stderr
    assert "conflicting dependencies" in said and f"torch=={TORCH_SERIES}.*" in said, said[-3000:]


# --- the sdist --------------------------------------------------------------------------------------

def test_sdist_holds_the_sources_and_marks_its_torch_requirement_dynamic(sdist):
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        pkg_info = tf.extractfile(next(m for m in tf.getmembers() if m.name.endswith("/PKG-INFO"))).read().decode()
    for needed in ("CMakeLists.txt", "pyproject.toml", "build_support/torch_pin.py", "csrc/i2x.cpp",
                   "csrc/cuda/cam_kernel.cu", "i2x/_build_config.py.in", "i2x/explain/explainer.py", "i2x/_internal/checks.py",
                   "i2x/cli/__init__.py"):
        assert needed in names, needed
    leaked = [n for n in names if n.startswith((".venv/", "build/")) or re.search(r"_C\..*\.so$", n)
              or n == "i2x/_build_config.py"]
    assert not leaked, leaked
    assert _torch_requirements(pkg_info) == ["torch>=2.4"]
    assert "Dynamic: Requires-Dist" in pkg_info


def test_wheel_built_from_the_sdist_passes_the_same_check(fresh_venv, wheel_from_sdist, tmp_path):
    assert _torch_requirements(_wheel_metadata(wheel_from_sdist)) == [f"torch=={TORCH_SERIES}.*"]
    _check_installed_wheel(fresh_venv, wheel_from_sdist, tmp_path)


# --- the rule behind the pin, where it is applied ------------------------------------------------------

def _torch_pin_module():
    spec = importlib.util.spec_from_file_location("torch_pin", REPO / "build_support" / "torch_pin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_pin_provider_per_build_state_and_its_errors(monkeypatch):
    torch_pin = _torch_pin_module()
    settings = {"torch-range": ">=2.4", "dependencies": ["torchvision", "numpy"]}
    provider = torch_pin.TorchPin()
    assert provider.dynamic_metadata(settings, {}) == {"dependencies": [f"torch=={TORCH_SERIES}.*", "torchvision", "numpy"]}
    provider.build_state("sdist")
    assert provider.dynamic_metadata(settings, {})["dependencies"][0] == "torch>=2.4"
    assert provider.dynamic_wheel(settings) == {"dependencies": True}
    assert torch_pin.torch_series("2.14.1+cu130") == "2.14" and torch_pin.torch_series("3.0.0a0") == "3.0"
    with pytest.raises(ValueError, match="release series"):
        torch_pin.torch_series("nightly")
    with pytest.raises(KeyError, match="unknown settings"):
        provider.dynamic_metadata({**settings, "pin": "yes"}, {})
    with pytest.raises(ValueError, match="torch-range"):
        provider.dynamic_metadata({**settings, "dependencies": ["Torch>=2"]}, {})
    with pytest.raises(TypeError, match="dependencies"):
        provider.dynamic_metadata({**settings, "dependencies": "numpy"}, {})

    def no_torch(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(torch_pin.importlib.metadata, "version", no_torch)
    wheel_provider = torch_pin.TorchPin()
    with pytest.raises(RuntimeError, match="no-build-isolation"):
        wheel_provider.dynamic_metadata(settings, {})


@pytest.mark.parametrize("version, loads", [(f"{TORCH_SERIES}.0", True), (f"{TORCH_SERIES}.97+cpu", True),
                                            ("1.13.1", False)])
def test_the_compiled_module_loads_under_any_patch_release_of_its_series_only(version, loads, tmp_path):
    script = (f"import torch; torch.__version__ = {version!r}\n"
              "try:\n    import i2x; i2x.build_info(); print('loaded')\n"
              "except ImportError as exc:\n    print('refused:', exc)\n")
    out = _run([sys.executable, "-P", "-c", script], cwd=tmp_path).stdout
    if loads:
        assert out.strip() == "loaded", out
    else:
        assert "refused:" in out and f"install torch=={TORCH_SERIES}.*" in out, out
