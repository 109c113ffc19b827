"""The HTML report (i2x.report, i2x report) against independent truths.

A small real run is built once: scikit-learn's digits (28 px), a small ResNet trained 2 epochs
with an online Tracker (6 checkpoints, 300 probe images, 8 prototypes), the analysis, the targets
and a 3-arm, 1-seed experiment. Truths: the checkpoint and prototype files read here with
safetensors directly and counted by hand (confusions, accuracy, presence, the pixels of each
exemplar patch), results.json's cells, Pillow decoding every image, the standard library's HTML
parser, and headless Chromium for what a reader sees.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import i2x
from i2x.report import (SECTIONS, confusion_matrices, exemplar_patches, image_size, patch_box, probe_accuracy,
                        prototype_presence, render_report, write_report)
from i2x.report.sections import experiment_series
from i2x.store import RunStore, RunStoreError

import _browser

MAX_BYTES = 5_000_000
EVIL = '<script>alert("x")</script> $\\alpha$ & co'


# ----------------------------------------------------------------------------------------------
# The run, built once


@pytest.fixture(scope="module")
def data():
    return i2x.load_dataset("digits"), i2x.load_dataset("digits", train=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data):
    train, test = data
    torch.manual_seed(0)
    model, layer = i2x.build_model("small-resnet", num_classes=10, in_channels=1, widths=(8, 16, 32))
    run = tmp_path_factory.mktemp("report") / "run"
    epochs, batch = 2, 128
    tracker = i2x.Tracker(model, layer, i2x.Probe.from_dataset(train, size=300), run, n_checkpoints=6,
                          planned_steps=epochs * -(-len(train) // batch), recalibrate_bn=128)
    i2x.train(model, train, epochs, batch_size=batch, tracker=tracker, precision="fp32")
    tracker.finish(prototypes={"n_prototypes": 8}, save_weights=True)
    i2x.analyze(run)
    try:
        i2x.find_targets(run, model, train)
    except i2x.NothingToCurate:
        pass  # the experiment then skips the curated arm, and the report says why
    i2x.experiment(run, model, train, test, arms=("full->full", "curated->full", "random->full"), seeds=1,
                   batch_size=128, precision="fp32")
    return run


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    """The full report, rendered once: (path, html text, parsed page)."""
    path = write_report(run_dir)
    text = path.read_text(encoding="utf-8")
    return path, text, _parse(text)


def _copy(run_dir, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("report"))
    return dst


def _edit_manifest(run, **fields):
    path = run / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in fields.items():
        manifest[key] = value
    path.write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------------------------
# Reading the page: the standard library's parser


class _Page(HTMLParser):
    """Sections (id -> h2 text), images (src, class, section), tables (section -> rows of cells),
    every tag name, every attribute that could fetch something."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections, self.images, self.tables, self.tags, self.links = {}, [], {}, set(), []
        self._section = self._h2 = None
        self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        for key in ("src", "href", "srcset", "data", "action", "poster"):
            if key in a:
                self.links.append(a[key])
        if tag == "section":
            self._section = a.get("id")
            self.sections[self._section] = None
        elif tag == "h2" and self._section is not None:
            self._h2 = ""
        elif tag == "img":
            self.images.append({"src": a.get("src", ""), "class": a.get("class"), "section": self._section})
        elif tag == "table":
            self.tables.setdefault(self._section, []).append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "h2" and self._h2 is not None:
            self.sections[self._section] = self._h2.strip()
            self._h2 = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._section][-1].append(self._row)
            self._row = None
        elif tag == "section":
            self._section = None

    def handle_data(self, text):
        if self._h2 is not None:
            self._h2 += text
        if self._cell is not None:
            self._cell += text


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _decode_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))
    assert image.format == "PNG"
    image.load()
    return image


# ----------------------------------------------------------------------------------------------
# The numbers behind the figures, against hand counts of the stored files


def _stored_probs(run):
    manifest = json.loads((run / "manifest.json").read_text())
    steps = [c["step"] for c in manifest["checkpoints"]]
    probs = [load_file(str(run / c["file"]))["probs"] for c in manifest["checkpoints"]]
    labels = load_file(str(run / "probe.safetensors"))["labels"]
    return steps, probs, labels, len(manifest["classes"])


def test_confusion_matrices_and_accuracy_equal_hand_counts(run_dir):
    steps, probs, labels, m = _stored_probs(run_dir)
    got_steps, hard = confusion_matrices(run_dir)
    acc_steps, accuracy = probe_accuracy(run_dir)
    assert got_steps == steps == acc_steps and hard.shape == (len(steps), m, m)
    for t, p in enumerate(probs):
        expected = np.zeros((m, m), dtype=np.int64)
        for y, row in zip(labels.tolist(), p.tolist()):
            expected[y, row.index(max(row))] += 1  # first maximum: ties to the lower class
        assert np.array_equal(hard[t].numpy(), expected)
        assert float(accuracy[t]) == pytest.approx(np.trace(expected) / len(labels), abs=1e-12)
    assert hard[-1].sum() == len(labels)


def test_prototype_presence_equals_hand_count(run_dir):
    t = load_file(str(run_dir / "prototypes.safetensors"))
    labels = load_file(str(run_dir / "probe.safetensors"))["labels"]
    assignment, k, m = t["assignment"], t["centroids"].shape[0], 10
    got = prototype_presence(assignment, labels, m, k)
    for c in range(m):
        rows = [i for i in range(len(labels)) if int(labels[i]) == c]
        for j in range(k):
            has = sum(1 for i in rows if (assignment[i] == j).any())
            assert float(got[c, j]) == pytest.approx(has / len(rows), abs=1e-12)


def test_patch_box_by_hand():
    # 28 px, 7 x 7 grid: cells of 4 px, patch = the cell and one cell around it = 12 px.
    assert patch_box(3, 3, (7, 7), (28, 28)) == (8, 8, 12, 12)
    assert patch_box(0, 0, (7, 7), (28, 28)) == (0, 0, 12, 12)      # shifted in, not cut
    assert patch_box(6, 2, (7, 7), (28, 28)) == (16, 4, 12, 12)
    assert patch_box(2, 5, (7, 7), (28, 28), context=0) == (8, 20, 4, 4)
    assert patch_box(1, 1, (2, 2), (8, 8), context=3) == (0, 0, 8, 8)  # larger than the image: all of it
    # A grid that does not divide the image: the cell's own pixels are always inside the box.
    for row in range(7):
        top, left, h, w = patch_box(row, row, (7, 7), (32, 32))
        assert top <= row * 32 // 7 and top + h >= -(-(row + 1) * 32 // 7) and 0 <= top and top + h <= 32


def test_exemplar_patches_are_the_probe_images_at_the_stored_cells(run_dir, data):
    train, _ = data
    protos = load_file(str(run_dir / "prototypes.safetensors"))
    probe_idx = load_file(str(run_dir / "probe.safetensors"))["indices"]
    exemplars = protos["exemplars"]
    seen = 0
    for k in range(exemplars.shape[0]):
        patches = exemplar_patches(run_dir, train, k)
        stored = [row for row in exemplars[k].tolist() if row[0] >= 0]
        assert [(p["sample"], p["row"], p["col"]) for p in patches] == [tuple(r) for r in stored]
        for p in patches:
            index = int(probe_idx[p["sample"]])
            top, left, h, w = p["box"]
            assert p["dataset_index"] == index and (h, w) == (12, 12)
            assert torch.equal(p["patch"], train.images[index][:, top:top + h, left:left + w])
            r, c = p["row"], p["col"]  # the cell's 4 x 4 pixels lie inside the patch
            assert top <= 4 * r and 4 * r + 4 <= top + h and left <= 4 * c and 4 * c + 4 <= left + w
            seen += 1
    assert seen > 0
    with pytest.raises(IndexError, match="prototype"):
        exemplar_patches(run_dir, train, exemplars.shape[0])


def test_image_size_from_targets_and_from_the_grid(run_dir, tmp_path):
    # digits are 28 px, the default: the targets store 28; without them the grid says "the default".
    assert image_size(run_dir) == (28 if (run_dir / "targets.safetensors").exists() else None)
    # Without targets, a run whose grid is 8 x 8 at small-resnet's layer3 (stride 4) had 32 px images.
    run = _copy(run_dir, tmp_path)
    for name in ("targets.json", "targets.safetensors"):
        (run / name).unlink(missing_ok=True)
    assert image_size(run) is None
    _edit_manifest(run, grid=[8, 8])
    assert image_size(run) == 32


def test_experiment_series_equal_results_cells(run_dir):
    results = json.loads((run_dir / "experiment" / "results.json").read_text())
    series = experiment_series(results)
    finished = [arm for arm, e in results["arms"].items() if e.get("seeds")]
    assert [s["arm"] for s in series] == finished
    for s in series:
        cells = results["arms"][s["arm"]]["seeds"]
        assert s["pair_confusions"] == [cells[str(seed)]["pair_confusions"] for seed in s["seeds"]]
        assert s["accuracy"] == [cells[str(seed)]["accuracy"] for seed in s["seeds"]]
        assert s["interval"]["mean"] == pytest.approx(np.mean(s["pair_confusions"]))


# ----------------------------------------------------------------------------------------------
# The page


def test_every_section_with_its_heading(report):
    _, _, page = report
    assert list(page.sections) == [sid for sid, _ in SECTIONS]
    assert list(page.sections.values()) == [title for _, title in SECTIONS]


def test_self_contained_small_and_every_image_a_png(report):
    path, text, page = report
    assert path.name == "index.html" and path.parent.name == "report"
    assert path.stat().st_size < MAX_BYTES
    assert "http://" not in text and "https://" not in text
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in page.links), \
        [link[:40] for link in page.links if not link.startswith(("data:", "#"))]
    assert len(page.images) >= 10
    for img in page.images:
        image = _decode_png(img["src"])
        assert image.width > 0 and image.height > 0
    sections_with_images = {img["section"] for img in page.images}
    assert {"prototypes", "training", "uncertain", "experiment"} <= sections_with_images


def test_pictures_of_the_data_are_shown(run_dir, report):
    _, _, page = report
    k = load_file(str(run_dir / "prototypes.safetensors"))["centroids"].shape[0]
    strips = [img for img in page.images if img["class"] == "strip" and img["section"] == "prototypes"]
    assert len(strips) == k  # one strip of exemplar patches per prototype
    reading = json.loads((run_dir / "analysis.json").read_text())["shortcuts"]
    shortcut_ids = {p["prototype"] for e in reading["per_class"] for p in e["flagged"]}
    # ... and one more for each prototype the model-wide reading flagged, beside its evidence
    assert len([img for img in page.images if img["class"] == "strip" and img["section"] == "uncertain"]) == len(
        shortcut_ids)
    assert any(img["class"] == "tile" for img in page.images if img["section"] == "uncertain")
    if (run_dir / "targets.safetensors").exists():
        assert any(img["class"] == "tile" for img in page.images if img["section"] == "curation")


def test_overview_numbers(run_dir, report):
    _, text, page = report
    rows = dict(page.tables["overview"][0])
    steps, probs, labels, _ = _stored_probs(run_dir)
    accuracy = float((probs[-1].argmax(1) == labels).double().mean())
    assert rows[f"probe accuracy (final checkpoint; {labels.numel()} train images)"] == f"{100 * accuracy:.2f}%"
    # The test set leads, from the experiment's starting model, and says which set it is.
    results = i2x.load_results(run_dir)
    n_test = results["config"]["test_size"]
    assert (f"Test set: accuracy <b>{100 * results['start']['accuracy']:.2f}%</b> on {n_test} test images"
            in text)
    assert rows["checkpoints"] == f"{len(steps)}: steps " + ", ".join(map(str, steps))
    assert rows["probe"].startswith("300 samples, grid 7x7")
    # The most confused pair: the analysis' first pair (same ranking), with the hand-counted confusions.
    a, b = json.loads((run_dir / "analysis.json").read_text())["uncertainty"][0]["pair"]
    pred = probs[-1].argmax(1)
    ab, ba = int(((labels == a) & (pred == b)).sum()), int(((labels == b) & (pred == a)).sum())
    assert rows["most confused pair on the probe (final checkpoint)"].startswith(f"{a} vs {b}: {ab + ba} confusions ({ab} + {ba})")


def test_experiment_table_is_the_results(run_dir, report):
    _, _, page = report
    results = json.loads((run_dir / "experiment" / "results.json").read_text())
    arms_table = next(t for t in page.tables["experiment"] if t[0][:2] == ["arm", "seeds"])
    shown = {row[0]: row for row in arms_table[1:]}
    for arm, s in results["summary"].items():
        assert shown[arm][1] == str(len(s["seeds"]))
        assert shown[arm][2].startswith(f"{100 * s['accuracy_mean']:.2f}")
        assert shown[arm][3].startswith(f"{s['pair_confusions_mean']:.1f}")


def test_one_seed_is_said_and_no_interval_is_claimed(report):
    """The fixture's experiment has one seed: the chart's caption says so instead of promising intervals."""
    _, text, _ = report
    section = text[text.index('id="experiment"'):]
    assert "one seed: no interval" in section
    assert "95% t-interval over seeds (bar)" not in section


def test_notes_for_stages_not_run(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    for name in ("analysis.json", "analysis.safetensors", "targets.json", "targets.safetensors"):
        (run / name).unlink(missing_ok=True)
    shutil.rmtree(run / "experiment")
    rep = render_report(run)
    assert any("not run yet: run `i2x analyze" in n for n in rep.notes["training"])
    assert any("not run yet: run `i2x analyze" in n for n in rep.notes["uncertain"])
    assert any("not run yet: run `i2x curate" in n for n in rep.notes["curation"])
    assert any("not run yet: run `i2x experiment" in n for n in rep.notes["experiment"])
    page = _parse(rep.html)
    assert list(page.sections) == [sid for sid, _ in SECTIONS]
    assert any(img["section"] == "training" for img in page.images)  # the checkpoints still render


def test_a_bare_run_renders_notes_only(tmp_path):
    run = tmp_path / "bare"
    RunStore.create(run, model={"name": "M", "layer": "layer3"}, dataset={"name": "digits", "split": "train"},
                    classes=[str(c) for c in range(10)], probe_indices=torch.arange(20),
                    probe_labels=torch.arange(20) % 10)
    rep = render_report(run)
    assert all(rep.notes[sid] for sid, _ in SECTIONS if sid != "overview")
    assert "not run yet" in " ".join(rep.notes["prototypes"] + rep.notes["training"])
    assert "<img" not in rep.html


def test_nothing_to_curate(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    (run / "targets.safetensors").unlink(missing_ok=True)
    RunStore.open(run).write_json("targets", {"schema": "i2x-targets", "schema_version": 1,
                                              "status": "nothing_to_curate", "pair": [4, 6],
                                              "message": "nothing to curate for (4, 6): no flagged prototype"})
    rep = render_report(run)
    assert rep.notes["curation"] == ["nothing to curate: nothing to curate for (4, 6): no flagged prototype"]
    assert "experiment" in _parse(rep.html).sections


def test_dataset_that_cannot_be_loaded(run_dir, tmp_path, monkeypatch):
    # mnist has digits' class names but is not on this machine (no I2X_DATA, an empty root).
    monkeypatch.delenv("I2X_DATA", raising=False)
    run = _copy(run_dir, tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    _edit_manifest(run, dataset={**manifest["dataset"], "name": "mnist"})
    rep = render_report(run, data_root=tmp_path / "empty")
    for sid in ("prototypes", "uncertain"):
        assert any(n.startswith("images not shown: dataset 'mnist' not found") for n in rep.notes[sid]), rep.notes
    page = _parse(rep.html)
    assert not [img for img in page.images if img["class"] in ("tile", "strip")]
    assert any(img["section"] == "training" for img in page.images)


def test_a_dataset_given_is_used_and_another_experiment_name_is_named(run_dir, data, tmp_path):
    train, _ = data
    out = tmp_path / "elsewhere" / "r.html"
    path = write_report(run_dir, dataset=train, experiment="other", out=out)
    assert path == out and out.exists() and not (run_dir / "report" / "r.html").exists()
    page = _parse(out.read_text(encoding="utf-8"))
    assert [img for img in page.images if img["class"] == "strip"]
    rep = render_report(run_dir, dataset=train, experiment="other")
    assert rep.notes["experiment"] == [f"not run yet: run `i2x experiment {run_dir} --data digits --name other`"]


def test_a_dataset_given_that_does_not_match_is_refused(run_dir, data):
    _, test = data
    with pytest.raises(ValueError, match="probe"):
        render_report(run_dir, dataset=test)


def test_strings_from_the_run_are_escaped(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    classes = [EVIL] + [str(c) for c in range(1, 10)]
    _edit_manifest(run, classes=classes)
    rep = render_report(run)  # the dataset no longer matches: its panels say so, everything else renders
    assert "<script" not in rep.html
    assert html_escaped(EVIL) in rep.html
    page = _parse(rep.html)
    assert "script" not in page.tags
    overview = dict(page.tables["overview"][0])
    assert overview["classes"].startswith("10: " + EVIL)  # the parser unescapes: the name reads as given
    assert any("does not match the run" in n for n in rep.notes["prototypes"])


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_corrupt_runs_raise_naming_the_problem(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path, "broken-manifest")
    (run / "manifest.json").write_text("{not json")
    with pytest.raises(RunStoreError, match="manifest.json"):
        write_report(run)
    run = _copy(run_dir, tmp_path, "missing-checkpoint")
    first = json.loads((run / "manifest.json").read_text())["checkpoints"][0]["file"]
    (run / first).unlink()
    with pytest.raises(RunStoreError, match="is missing"):
        write_report(run)
    run = _copy(run_dir, tmp_path, "torn-analysis")
    (run / "analysis.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(RunStoreError, match="analysis"):
        write_report(run)
    with pytest.raises(RunStoreError, match="does not exist"):
        write_report(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# The command


def test_cli_json(run_dir, tmp_path, capsys):
    from i2x.cli import main

    out = tmp_path / "r" / "page.html"
    assert main(["report", str(run_dir), "--out", str(out), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["report"] == str(out) and answer["bytes"] == out.stat().st_size
    assert answer["sections"] == [sid for sid, _ in SECTIONS]
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# What a reader sees: headless Chromium


def test_renders_in_chromium(report, tmp_path):
    why = _browser.unavailable()
    if why:
        if os.environ.get("I2X_REQUIRE_BROWSER") == "1":
            pytest.fail(f"I2X_REQUIRE_BROWSER=1 but the browser check cannot run: {why}")
        pytest.skip(why)
    path, _, page = report
    shot = tmp_path / "report.png"
    result = _browser.render(path, shot)
    assert result["errors"] == [], result["errors"]
    assert result["requests"] == []
    assert result["sections"] == [sid for sid, _ in SECTIONS]
    assert len(result["images"]) == len(page.images)
    bad = [img for img in result["images"]
           if not (img["complete"] and img["decoded"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0)]
    assert bad == []
    screenshot = Image.open(shot)
    assert screenshot.format == "PNG" and screenshot.width > 0 and screenshot.height > 1000


def test_the_page_is_navigable_and_the_cards_are_tables(run_dir, report):
    """A table of contents whose every link lands on an element of the page, one short table per
    prototype card, and the long parts collapsed (<details>) past the first few."""
    import re

    _, text, page = report
    ids = set(re.findall(r'\sid="([^"]+)"', text))
    anchors = re.findall(r'href="#([^"]+)"', text)
    toc = text[text.index('<nav class="toc">'):text.index("</nav>")]
    k = load_file(str(run_dir / "prototypes.safetensors"))["centroids"].shape[0]
    assert all(f'href="#{sid}"' in toc for sid, _ in SECTIONS)
    assert all(f'href="#prototype-{j}"' in toc for j in range(k))
    assert anchors and set(anchors) <= ids, set(anchors) - ids
    assert text.count('<table class="card">') == k
    cards = [m.start() for m in re.finditer(r'<div class="proto" id="prototype-', text)]
    if k > 4:  # past the first four, the cards sit inside one collapsed block
        details = text.index("<details><summary>prototypes 4-")
        assert all(pos > details for pos in cards[4:]) and all(pos < details for pos in cards[:4])


def test_the_model_wide_shortcut_reading_is_shown_as_the_analysis_holds_it(run_dir, report):
    _, text, page = report
    reading = json.loads((run_dir / "analysis.json").read_text())["shortcuts"]
    flagged = [(e["name"], p) for e in reading["per_class"] for p in e["flagged"]]
    assert "Shortcut candidates over the whole model" in text
    tables = [t for t in page.tables["uncertain"] if t[0][:2] == ["class", "prototype"]]
    if not flagged:
        assert not tables and "No prototype clears the cut" in text
        return
    rows = tables[0][1:]
    assert [(row[0], int(row[1])) for row in rows] == [(name, p["prototype"]) for name, p in flagged]
    assert [row[2] for row in rows] == [f"{p['score']:.3g}" for _, p in flagged]


def test_the_label_diagnosis_is_shown_with_its_likeliest_mislabelled_images(run_dir, data, tmp_path):
    """A labels.json written by hand: its lines appear as they are, and each exemplar is a tile
    captioned with its stored label and the pair's other class."""
    train, _ = data
    run = _copy(run_dir, tmp_path)
    assert "Shortcut or class overlap" not in render_report(run, dataset=train).html  # none yet
    fours = (train.labels == 4).nonzero().flatten()[:2].tolist()
    nines = (train.labels == 9).nonzero().flatten()[:1].tolist()
    entry = {"pair": [4, 9], "names": ["4", "9"], "images": 290, "issues": 3, "issue_share": 3 / 290,
             "overlap": 0.004, "overlapping": 3, "issue_positions": fours + nines, "exemplars": fours + nines,
             "shortcut_prototypes": [], "verdict": "unclear", "line": "4 vs 9: a line written by hand"}
    (run / "labels.json").write_text(json.dumps({"schema": "i2x-labels", "schema_version": 1, "pairs": [entry],
                                                 "issues": 0.01, "images": 1000, "folds": 5, "seed": 0,
                                                 "accuracy": 0.9, "probabilities": "by hand"}))
    html = render_report(run, dataset=train).html
    assert "Shortcut or class overlap" in html and "<li>4 vs 9: a line written by hand</li>" in html
    names = train.classes
    assert html.count(f"labelled {names[4]}, likely {names[9]}") == 2 * 2  # alt text and caption, two images
    assert html.count(f"labelled {names[9]}, likely {names[4]}") == 2
