"""The analysis held to a planted truth (tests/_planted.py).

Four classes of drawn shapes; classes 0 and 1 share a ring, and in 30% of their samples the ring
is all there is. Training a small ResNet with an online Tracker, finding prototypes and running
the analysis with its defaults must:
- find the ring: a prototype that sits on rings and is a shared prototype of both classes 0, 1;
- flag it uncertain for the pair (0, 1), one of the most confused pairs;
- not flag the prototypes of the shapes unique to one class of the pair (bar, plus);
- answer "why does it look there" for a ring-only sample with the ring's prototype.
What the planted truth is checked against is the drawing itself (where every shape was placed),
never the analysis' own output.
"""

from __future__ import annotations

import pytest
import torch

from i2x.analysis import analyze, explain_sample
from i2x.store import RunStore

from _planted import CLASSES, SHAPES, prototype_shapes, shape_map, train_and_track


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("planted") / "run"
    store, placements = train_and_track(run_dir, seed=0)
    analysis = analyze(store)
    assignment = store.read_tensors("prototypes")["assignment"]
    return RunStore.open(run_dir), placements, analysis, assignment, prototype_shapes(assignment, placements)


def test_the_model_learned_and_the_pair_stays_confused(planted_run):
    store, _, analysis, _, _ = planted_run
    steps, _, probs = store.load_all()
    labels = store.probe_labels()
    accuracy = (probs.argmax(2) == labels).float().mean(1)
    assert accuracy[0] < 0.4 < 0.9 < accuracy[-1]  # from chance to learned
    confusion = analysis.tensors["confusion"][-1]
    pair = int(confusion[0, 1] + confusion[1, 0])
    others = int(confusion.sum() - confusion.diagonal().sum()) - pair
    assert pair > 0 and pair >= others  # the ring-only samples are where the errors are
    assert [0, 1] in [u["pair"] for u in analysis.data["uncertainty"]]


def test_the_shared_shape_is_found(planted_run):
    _, _, analysis, _, shapes = planted_run
    rings = [k for k, s in enumerate(shapes) if s == "ring"]
    assert rings, f"no prototype sits on the rings: {shapes}"
    shared = {c: {e["prototype"] for e in analysis.per_class(c)["shared"]} for c in range(len(CLASSES))}
    assert any(k in shared[0] and k in shared[1] for k in rings)
    # ...and it is shared by the two ring classes only.
    for k in rings:
        assert k not in shared[2] and k not in shared[3]


def test_the_shared_shape_is_flagged_uncertain_and_unique_shapes_are_not(planted_run):
    _, _, analysis, _, shapes = planted_run
    flagged = [f["prototype"] for f in analysis.uncertainty(0, 1)["flagged"]]
    assert any(shapes[k] == "ring" for k in flagged), (flagged, shapes)
    unique = [k for k, s in enumerate(shapes) if s in ("bar", "plus")]
    assert unique, f"no prototype sits on the unique shapes: {shapes}"
    assert not any(k in flagged for k in unique), (flagged, shapes)
    # Prototypes that one class of the pair never shows are not even candidates.
    eligible = analysis.tensors["uncertainty.a0.b1.eligible"]
    assert not any(bool(eligible[k]) for k in unique)


def test_why_does_it_look_there_for_a_ring_only_sample(planted_run):
    store, placements, analysis, assignment, shapes = planted_run
    ring_only = [i for i, where in enumerate(placements) if list(where) == ["ring"]]
    assert ring_only
    index = ring_only[0]
    answer = explain_sample(store, index, top=3)
    record = answer.to_dict()
    assert record["index"] == index and answer.true_class in (0, 1)
    # The top positions are the sample's largest saliency cells (checked from the stored grid)...
    final = store.load_checkpoint(store.finished_steps()[-1])["saliency"][index].float()
    top_cells = set(torch.topk(final.flatten(), 3).indices.tolist())
    got = {p["row"] * final.shape[1] + p["col"] for p in record["positions"]}
    assert got == top_cells
    # ...they lie on the ring, and their prototypes are the ring's.
    where = shape_map(placements, final.shape[0])[index]
    on_ring = [where[p["row"], p["col"]] == SHAPES.index("ring") for p in record["positions"]]
    assert sum(on_ring) >= 2
    protos = {p["prototype"] for p in record["positions"]}
    assert any(shapes[k] == "ring" for k in protos)
    assert all(int(assignment[index, p["row"], p["col"]]) == p["prototype"] for p in record["positions"])
