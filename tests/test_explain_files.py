"""``i2x explain --model WEIGHTS IMAGE|FOLDER``: image files explained with a run's model.

Truths computed here, independently of ``i2x.apps.explain_files``: the prediction of the run's model
(rebuilt from the manifest, weights read with safetensors) on the PNG decoded by PIL and normalised
with the digits statistics; the raw GradCAM grid from autograd on a hooked activation with
``i2x.reference.cam``; the prototype assignment with ``i2x.reference.prototype_assign`` on the
run's stored PCA and centroids; each prototype's share as the saliency summed over its positions
over the total.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import i2x
from i2x import reference
from i2x.cli import main
from i2x.data import DATASET_INFO, load_dataset, make_loader
from i2x.models import rebuild_model

N_PROTOTYPES = 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Three epochs of a small-resnet on digits, tracked (3 checkpoints), prototypes, weights, analysis."""
    folder = tmp_path_factory.mktemp("explain") / "run"
    train = load_dataset("digits")
    torch.manual_seed(0)
    model, layer = i2x.build_model("small-resnet", 10, widths=(8, 16, 32))
    probe = i2x.Probe.from_dataset(train, size=100, seed=0)
    loader = make_loader(train, batch_size=64, shuffle=True, seed=0)
    epochs = 3  # confident predictions: the top-k order must not hinge on rounding
    tracker = i2x.Tracker(model, layer, probe, folder, planned_steps=epochs * len(loader), n_checkpoints=3,
                          recalibrate_bn=100)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    step = 0
    for _ in range(epochs):
        for x, y in loader:
            step += 1
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            tracker.step(step)
    tracker.finish(step, prototypes={"n_prototypes": N_PROTOTYPES, "pca_dim": 8}, save_weights=True)
    i2x.analyze(folder, n_pairs=2)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four test-split digits as 28 x 28 grayscale PNGs, and one as a 40 x 56 RGB PNG."""
    folder = tmp_path_factory.mktemp("images")
    test = load_dataset("digits", train=False)
    pixels = test.denormalize(test.images[:4]).clamp(0, 1)
    for i, p in enumerate(pixels):
        Image.fromarray(np.round(p[0].numpy() * 255).astype(np.uint8)).save(folder / f"digit_{i}.png")
    big = Image.open(folder / "digit_0.png").convert("RGB").resize((40, 56), Image.Resampling.BILINEAR)
    (folder / "rgb").mkdir()
    big.save(folder / "rgb" / "tall.png")
    return folder


def _reference_model(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    model, _ = rebuild_model(manifest["model"]["build"])
    model.load_state_dict(load_file(str(run_dir / "weights.safetensors")))
    return model.eval(), manifest["model"]["layer"]


def _png_tensor(path):
    info = DATASET_INFO["digits"]
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    return ((torch.from_numpy(pixels) - info.mean[0]) / info.std[0])[None, None]


def _reference_explanation(model, layer, x):
    """Logits, raw GradCAM grid (predicted class) and layer features, by hand."""
    seen = {}

    def hook(_m, _i, out):
        out.retain_grad()
        seen["a"] = out

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    pred = logits.argmax(1)
    logits.gather(1, pred[:, None]).sum().backward()
    a = seen["a"]
    return logits.detach(), reference.cam(a.detach(), a.grad, "gradcam", relu=True), a.detach()


def cli(argv, capsys):
    """Run ``i2x ARGV`` through ``i2x.cli.main``: (status, stdout, stderr)."""
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def explained(run_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    from i2x.apps.explain_files import explain_files

    return explain_files(run_dir, [images, images / "rgb"], out=out, top=3), out


def test_overlays_exist_with_the_image_size(explained, images):
    result, out = explained
    assert [e["file"] for e in result["images"]] == [str(images / f"digit_{i}.png") for i in range(4)] + [
        str(images / "rgb" / "tall.png")]
    for e in result["images"]:
        with Image.open(e["overlay"]) as img:
            assert img.format == "PNG" and img.mode == "RGB"
            with Image.open(e["file"]) as original:
                assert img.size == original.size
    assert (out / "digit_3.png").exists() and (out / "tall.png").exists()
    assert json.loads((out / "explanations.json").read_text()) == result


def test_prediction_and_structured_part_match_an_independent_computation(explained, run_dir, images):
    result, _ = explained
    model, layer = _reference_model(run_dir)
    protos = load_file(str(run_dir / "prototypes.safetensors"))
    for e in result["images"][:4]:
        x = _png_tensor(e["file"])
        logits, grid, features = _reference_explanation(model, layer, x)
        probs = torch.softmax(logits, 1)[0]
        assert e["predicted"]["class"] == int(probs.argmax())
        assert e["predicted"]["prob"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert [t["class"] for t in e["top"]] == torch.topk(probs, 3).indices.tolist()
        g = grid[0]
        assert e["grid"] == list(g.shape)
        if int((g == g.max()).sum()) == 1:
            assert (e["peak"]["row"], e["peak"]["col"]) == divmod(int(g.argmax()), g.shape[1])
        assign, _ = reference.prototype_assign(features, protos["centroids"], protos["mean"], protos["components"])
        assign = assign[0]
        present = sorted(int(k) for k in assign.unique())
        got = {p["prototype"]: p for p in e["prototypes"]}
        assert sorted(got) == present
        total = float(g.sum())
        for k in present:
            mask = assign == k
            assert got[k]["positions"] == int(mask.sum())
            assert got[k]["share"] == pytest.approx(float(g[mask].sum()) / total, abs=1e-5)
        assert sum(p["share"] for p in e["prototypes"]) == pytest.approx(1.0, abs=1e-6)
        shares = [p["share"] for p in e["prototypes"]]
        assert shares == sorted(shares, reverse=True)


def test_classes_of_the_prototypes_come_from_the_run(explained, run_dir):
    result, _ = explained
    analysis = json.loads((run_dir / "analysis.json").read_text())
    names = analysis["classes"]
    shared = {}
    for entry in analysis["per_class"]:
        for p in entry["shared"]:
            shared.setdefault(p["prototype"], []).append(names[entry["class"]])
    assignment = load_file(str(run_dir / "prototypes.safetensors"))["assignment"]
    labels = load_file(str(run_dir / "probe.safetensors"))["labels"]
    for e in result["images"]:
        for p in e["prototypes"]:
            assert p["shared_in"] == shared.get(p["prototype"], [])
            top = p["probe_presence"][0]
            in_class = assignment[labels == top["class"]]
            truth = float((in_class == p["prototype"]).flatten(1).any(1).double().mean())
            assert top["presence"] == pytest.approx(truth, abs=1e-9)
    assert result["model"]["prototypes"]["count"] == N_PROTOTYPES
    assert result["model"]["normalization"]["source"] == "digits" and result["model"]["size"] == 28


def test_cli_json_with_a_weights_file_and_run(run_dir, images, tmp_path, capsys, explained):
    out = tmp_path / "o"
    rc, stdout, err = cli(["explain", "--model", str(run_dir / "weights.safetensors"), "--arch", "small-resnet",
                           "--run", str(run_dir), str(images / "digit_1.png"), "--out", str(out), "--json",
                           "--top", "3"], capsys)
    assert rc == 0, err
    answer = json.loads(stdout)
    assert answer == json.loads((out / "explanations.json").read_text())
    # The same model and prototypes as the run-folder form: the same explanation.
    same = explained[0]["images"][1]
    mine = answer["images"][0]
    # (batch 1 here, 5 there: equal up to the batched convolution's rounding)
    assert mine["predicted"]["class"] == same["predicted"]["class"]
    assert [p["prototype"] for p in mine["prototypes"]] == [p["prototype"] for p in same["prototypes"]]
    for a, b in zip(mine["prototypes"], same["prototypes"]):
        assert a["share"] == pytest.approx(b["share"], abs=1e-5) and a["flagged_for"] == b["flagged_for"]


def test_cli_text_with_a_torch_file_and_no_run(run_dir, images, tmp_path, capsys):
    weights = tmp_path / "final.pt"
    torch.save(load_file(str(run_dir / "weights.safetensors")), weights)
    out = tmp_path / "o"
    rc, stdout, err = cli(["explain", "--model", str(weights), "--arch", "small-resnet", str(images / "rgb"),
                           "--out", str(out)], capsys)
    assert rc == 0, err
    assert "tall.png: predicted" in stdout and "saliency peak" in stdout
    result = json.loads((out / "explanations.json").read_text())
    assert "prototypes" not in result["images"][0] and result["model"]["prototypes"] is None
    assert result["model"]["normalization"]["source"].startswith("none")
    with Image.open(out / "tall.png") as img:
        assert img.size == (40, 56)


def test_probe_sample_form_still_works(run_dir, capsys):
    rc, stdout, err = cli(["explain", str(run_dir), "5", "--top", "3", "--json"], capsys)
    assert rc == 0, err
    answer = json.loads(stdout)
    assert answer["index"] == 5 and len(answer["positions"]) == 3


def _corrupt(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    return bad


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not_image", "not an image file"),
    ("good_then_not_image", "not an image file"),
    ("empty_folder", "holds no image files"),
    ("no_arch", "--arch is needed"),
    ("wrong_arch", "do not fit --arch resnet18: keys"),
    ("index_with_model", "INDEX 5 given with --model"),
    ("run_as_image", "is a run folder, not an image"),
    ("file_option_without_model", "--arch: only with --model"),
    ("bad_index", "INDEX: expected an integer"),
    ("wrong_size", "pass the --size"),
    ("missing_weights", "no such run folder or weights file"),
])
def test_errors_are_one_line_with_status_2(case, message, run_dir, images, tmp_path, capsys):
    weights = str(run_dir / "weights.safetensors")
    img = str(images / "digit_0.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    argv = {
        "missing": ["--model", str(run_dir), str(tmp_path / "nope.png")],
        "not_image": ["--model", str(run_dir), str(_corrupt(tmp_path))],
        "good_then_not_image": ["--model", str(run_dir), img, str(_corrupt(tmp_path))],
        "empty_folder": ["--model", str(run_dir), str(tmp_path / "empty")],
        "no_arch": ["--model", weights, img],
        "wrong_arch": ["--model", weights, "--arch", "resnet18", img],
        "index_with_model": ["--model", str(run_dir), str(run_dir), "5"],
        "run_as_image": ["--model", weights, "--arch", "small-resnet", str(run_dir)],
        "file_option_without_model": [str(run_dir), "5", "--arch", "small-resnet"],
        "bad_index": [str(run_dir), "five"],
        "wrong_size": ["--model", str(run_dir), img, "--size", "64"],
        "missing_weights": ["--model", str(tmp_path / "w.safetensors"), "--arch", "small-resnet", img],
    }[case]
    rc, _, err = cli(["explain", *argv, "--out", str(tmp_path / "o")] if "--model" in argv else ["explain", *argv],
                     capsys)
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists(), "a refused command left its output folder behind"


def test_mismatch_names_the_keys_briefly(run_dir):
    from i2x._internal.weights import load_state_into as load_state
    from i2x.models import build_model

    model, _ = build_model("small-resnet", 10, widths=(8, 16, 64))
    state = load_file(str(run_dir / "weights.safetensors"))
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    with pytest.raises(ValueError) as info:
        load_state(model, state, "w.safetensors", "small-resnet (8, 16, 64)")
    text = str(info.value)
    assert "1 missing (fc.bias)" in text and "1 unexpected (extra.weight)" in text
    assert "layer3.0.conv1.weight [32, 16, 3, 3] vs [64, 16, 3, 3]" in text and "more" in text


def test_overlay_is_the_heat_in_jet_over_the_image(explained, run_dir):
    """The overlay's pixels: half the image, half the jet colour of the min-max'd bilinear heat."""
    result, _ = explained
    model, layer = _reference_model(run_dir)
    e = result["images"][0]
    _, grid, _ = _reference_explanation(model, layer, _png_tensor(e["file"]))
    heat = F.interpolate(grid[:, None], size=(28, 28), mode="bilinear", align_corners=False)[0, 0]
    heat = ((heat - heat.min()) / (heat.max() - heat.min())).numpy()
    jet = np.clip(np.stack([1.5 - np.abs(4 * heat - 3), 1.5 - np.abs(4 * heat - 2), 1.5 - np.abs(4 * heat - 1)], -1),
                  0, 1)
    image = np.asarray(Image.open(e["file"]).convert("RGB"), dtype=np.float64) / 255
    expected = np.round((0.5 * image + 0.5 * jet) * 255)
    got = np.asarray(Image.open(e["overlay"]), dtype=np.float64)
    assert np.abs(got - expected).max() <= 1.0
