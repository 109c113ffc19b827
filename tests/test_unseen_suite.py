"""The unseen-marks suite's scoring (scripts/unseen_shortcuts.py) against hand-computed figures.

The suite publishes, per mark, the mark's cost, the share of the gap the loop's outcome recovers,
whether the outcome is harmless, and whether a flagged prototype is the mark's. Each is checked
here on numbers small enough to work out by hand: confusion matrices with known error counts, and
a probe of four 2x2-cell images whose prototype assignment and marks are written out.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

import pytest
import torch

from i2x.loop.planted import PlantedMark

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "unseen_shortcuts.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("unseen_shortcuts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell(errors: int) -> dict:
    """A 2-class confusion matrix of 100 test images with ``errors`` of them wrong."""
    return {"confusion": [[50 - errors, errors], [0, 50]]}


def results(**per_arm: list[int]) -> dict:
    return {"start": cell(40), "arms": {arm: {"seeds": {str(s): cell(e) for s, e in enumerate(errs)}}
                                        for arm, errs in per_arm.items()}}


def test_errors_gap_and_recovered_share_by_hand(suite):
    r = results(**{"full->full": [30, 32, 34], "clean": [10, 12, 14], "transplanted->full": [20, 22, 14]})
    assert suite.errors_of(cell(7)) == 7
    gap = suite.gap_of(r)  # 20 errors on every seed: no spread
    assert gap["mean"] == 20 and gap["std"] == 0
    recovered = suite.gap_recovered(r, "transplanted->full")  # (30-20)/20, (32-22)/20, (34-14)/20
    assert recovered["mean"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    half = 4.302653 * statistics.stdev([0.5, 0.5, 1.0]) / math.sqrt(3)  # t(0.975, 2 df)
    assert recovered["lo"] == pytest.approx(recovered["mean"] - half, rel=1e-4)
    versus = suite.versus_full(r, "transplanted->full")
    assert versus["mean"] == pytest.approx((-10 - 10 - 20) / 3)


def test_against_full_full_on_a_held_out_split_reads_that_splits_errors(suite):
    r = results(**{"full->full": [30, 32, 34], "curated->curated": [20, 22, 14]})
    for arm, held in (("full->full", [100, 90, 80]), ("curated->curated", [104, 95, 81])):
        for s, e in enumerate(held):
            r["arms"][arm]["seeds"][str(s)]["validation"] = {"errors": e}
    assert suite.versus_full(r, "curated->curated", "validation") == suite.paired_interval([4, 5, 1])
    assert suite.versus_full(r, "curated->curated")["mean"] == pytest.approx(-40 / 3)  # test: the other way
    assert suite.versus_full(r, "curated->curated", "counterfactual") is None  # not evaluated there
    del r["arms"]["full->full"]["seeds"]["2"]["validation"]  # only the seeds both have
    assert suite.versus_full(r, "curated->curated", "validation") == suite.paired_interval([4, 5])


def test_the_outcome_is_harmless_only_when_its_interval_clears_minus_five_percent(suite):
    steady = results(**{"full->full": [30, 31, 32], "clean": [10, 11, 12], "curated->full": [31, 32, 33]})
    out = suite.outcome_of(steady, "curated->full")  # -1/20 = -5% on every seed: the bound itself
    assert out["gap_recovered"]["mean"] == pytest.approx(-0.05)
    assert out["harmless"] is False  # "above -5%", strictly
    better = results(**{"full->full": [30, 31, 32], "clean": [10, 11, 12], "curated->full": [29, 30, 31]})
    assert suite.outcome_of(better, "curated->full")["harmless"] is True  # +5% on every seed
    spread = results(**{"full->full": [30, 31, 32], "clean": [10, 11, 12], "curated->full": [30, 31, 31]})
    # 0, 0, +5%: mean +1.7%, but the interval (t 4.30, sd 2.9%) reaches -5.5%: not shown harmless
    assert suite.outcome_of(spread, "curated->full")["harmless"] is False
    # the mark cost nothing (clean above full->full): no share of a gap, the errors decide
    free = results(**{"full->full": [30, 31, 32], "clean": [40, 41, 42], "curated->full": [35, 36, 37]})
    out = suite.outcome_of(free, "curated->full")  # +5 errors on every seed: worse
    assert out["gap_recovered"] is None and out["worse"] is True and out["harmless"] is False
    assert suite.outcome_of(steady, "curated->full")["worse"] is True  # +1 on every seed, no spread
    kept = suite.outcome_of(steady, None)  # nothing recommended: the user's plan is unchanged
    assert kept["arm"] == "kept" and kept["gap_recovered"]["mean"] == 0.0 and kept["harmless"] is True
    assert kept["start_errors"] == 40


def test_a_prototype_is_the_marks_when_it_holds_it_and_appears_where_it_is(suite):
    """Four probe images of 4x4 pixels on a 2x2 cell grid. The mark sits in the top-left cell of
    images 0 and 1. Prototype 1 takes both marked cells (holds 2/2) and appears only in images 0
    and 1 (marked 2/2); prototype 0 takes everything else."""
    assignment = torch.zeros(4, 2, 2, dtype=torch.long)
    assignment[0, 0, 0] = assignment[1, 0, 0] = 1
    assignment[0, 1, 1] = 1  # a neighbouring cell of a marked image: still the mark's prototype
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, 0, 0] = True
    planted = PlantedMark(dataset=None, marked=torch.tensor([True, True, False, False]),
                          indices=torch.tensor([0, 1]), masks=masks)

    class Store:
        def probe(self):
            return torch.arange(4), None

        def read_tensors(self, name, keys):
            return {"assignment": assignment}

    on = suite.prototype_on_mark(Store(), planted)
    assert on["holds"].tolist() == [0.0, 1.0]
    assert on["marked"].tolist() == [0.5, 1.0]  # prototype 0 is in all four images, two marked
    assert on["own"].tolist() == [False, True]  # both shares above one half: prototype 1 alone
    assert [suite.is_own({"holds": h, "marked": m}) for h, m in ((0.0, 0.5), (1.0, 1.0), (0.5, 1.0))] == [
        False, True, False]  # "above one half", strictly
    # the same over a subset of the images: 0 and 2 (one marked); prototype 1 is only in image 0
    sub = planted.prototype_shares(torch.tensor([0, 2]), assignment[[0, 2]])
    assert sub["holds"].tolist() == [0.0, 1.0] and sub["marked"].tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match=r"assignment: expected \[len\(indices\), h, w\] = \[3, h, w\]"):
        planted.prototype_shares(torch.tensor([0, 1, 2]), assignment)


def test_pooled_figures_by_hand(suite):
    def row(i, found, relied, tp, count, marked, recovered):
        return {"index": i, "found": found, "relied_on_mark": relied, "marked_train_images": marked,
                "targets": {"true_positives": tp, "count": count},
                "outcome": {"gap_recovered": {"mean": recovered}, "harmless": recovered > -0.05}}

    rows = [row(0, True, True, 90, 100, 100, 0.9), row(1, False, True, 0, 50, 100, -0.5),
            row(2, False, False, 0, 0, 100, 0.0)]
    rows[2]["targets"] = {"none": "nothing flagged"}
    pooled = suite.pool(rows)
    assert pooled["targets_precision_recall"] == "0.600 / 0.300"  # 90 of 150 chosen, of 300 marked
    assert pooled["targets_precision_recall_found"] == "0.900 / 0.900"
    assert pooled["median_gap_recovered_relied_on"] == "+20%"  # median of 0.9 and -0.5
    assert pooled["median_gap_recovered_all"] == "+0%"
    assert (pooled["found"], pooled["found_of_relied_on"], pooled["harmless"]) == (1, 1, 2)
    assert pooled["missed"] == [1, 2]


def test_refitting_prototypes_finds_a_mark_with_features_of_its_own():
    """scripts/unseen_prototypes.py's refit, on features written out: 8 images on a 2x2 grid, every
    cell the same vector except the top-left cell of the 4 marked images, which holds the mark's own
    vector. With 2 prototypes one takes exactly the mark's cells: it holds all of them (1.0) and
    appears only in marked images (1.0), so it is the mark's own and the only pure one."""
    spec = importlib.util.spec_from_file_location("unseen_prototypes", SCRIPT.with_name("unseen_prototypes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    g = torch.Generator().manual_seed(0)
    features = torch.zeros(8, 4, 2, 2)
    features[:, 0] = 1.0
    features[:4, :, 0, 0] = torch.tensor([0.0, 10.0, 0.0, 0.0])  # the mark: another direction
    features += 0.01 * torch.randn(features.shape, generator=g)
    masks = torch.zeros(4, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True  # the top-left 2x2 pixels: the top-left cell of a 2x2 grid
    planted = PlantedMark(dataset=None, marked=torch.arange(8) < 4, indices=torch.arange(4), masks=masks)
    fit = module.refit(features, planted, torch.arange(8), 2)
    assert fit["own"] is True
    assert (fit["closest"]["holds"], fit["closest"]["marked"]) == (1.0, 1.0)
    assert fit["pure_prototypes"] == [fit["closest"]["prototype"]] and fit["pure_hold"] == 1.0
