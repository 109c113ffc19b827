"""i2x.explain.metrics against hand-computed curves and confidences.

Most cases use a planted "model" that is a fixed linear function of the pixels with two classes:
logits = [w . x, 0], so p(class 0) = e^z / (e^z + 1) with z = w . x. With log-weights
(w = ln 2, ln 3, ...) and small integer pixels, e^z is an integer r and every probability is the
fraction r / (r + 1), written out in the comments. Pixels are indexed by their flat position
y * W + x: for a 2x2 image [[p0, p1], [p2, p3]].
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_close

from i2x.explain import metrics

F64 = torch.float64
LN2, LN3, LN5, LN7 = (math.log(v) for v in (2, 3, 5, 7))


def p2(s: float) -> float:
    """p(class 0) when z = s * ln 2, i.e. e^z = 2^s."""
    return 2.0**s / (2.0**s + 1)


def linear_model(weights, device="cpu", dtype=F64) -> nn.Module:
    """logits = [w . flatten(x), 0] (no bias)."""
    w = torch.as_tensor(weights, dtype=dtype).flatten()
    lin = nn.Linear(w.numel(), 2, bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([w, torch.zeros_like(w)]))
    return nn.Sequential(nn.Flatten(), lin).to(device)


def img(values, device="cpu", dtype=F64) -> torch.Tensor:
    """[C, H, W] (or [H, W]) nested list -> [1, C, H, W]."""
    t = torch.tensor(values, dtype=dtype, device=device)
    return t.reshape(1, -1, *t.shape[-2:])


def sal(values, device="cpu", dtype=F64) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype, device=device)
    return t.reshape(1, *t.shape[-2:])


def expect(values, device="cpu", dtype=F64) -> torch.Tensor:
    return torch.tensor([values], dtype=dtype, device=device)


# The 2x2 workhorse: image of ones, w = [ln2, ln3, ln5, ln7] -> z = ln(product of the kept weights'
# exponentials): all four kept -> e^z = 2*3*5*7 = 210.
PRIMES = [[LN2, LN3], [LN5, LN7]]
ONES = [[1.0, 1.0], [1.0, 1.0]]
# saliency flat [0.1, 0.9, 0.4, 0.7] -> ranking p1 (0.9), p3 (0.7), p2 (0.4), p0 (0.1)
SAL_1320 = [[0.1, 0.9], [0.4, 0.7]]


# --------------------------------------------------------------------------------------------
# Curves, point by point


def test_deletion_and_insertion_zeros_by_hand(device):
    model = linear_model(PRIMES, device)
    x, s, t = img(ONES, device), sal(SAL_1320, device), torch.tensor([0], device=device)
    deletion = metrics.deletion_curve(model, x, s, t, steps=4, baseline="zeros")
    # remove p1 (3), p3 (7), p2 (5), p0 (2) in turn: e^z = 210, 70, 10, 2, 1
    assert_close(deletion, expect([210 / 211, 70 / 71, 10 / 11, 2 / 3, 1 / 2], device), tag="metrics")
    insertion = metrics.insertion_curve(model, x, s, t, steps=4, baseline="zeros")
    # reveal p1, p3, p2, p0 on black: e^z = 1, 3, 21, 105, 210
    assert_close(insertion, expect([1 / 2, 3 / 4, 21 / 22, 105 / 106, 210 / 211], device), tag="metrics")


def test_targets_pick_the_class():
    model = linear_model(PRIMES)
    x = img(ONES).repeat(2, 1, 1, 1)
    s = sal(SAL_1320).repeat(2, 1, 1)
    deletion = metrics.deletion_curve(model, x, s, [0, 1], steps=4, baseline="zeros")  # a list works too
    # class 1 has logit 0: p1 = 1 / (e^z + 1) = 1 - p0
    p0 = [210 / 211, 70 / 71, 10 / 11, 2 / 3, 1 / 2]
    assert_close(deletion, torch.tensor([p0, [1 - v for v in p0]], dtype=F64), tag="metrics")


@pytest.mark.parametrize(
    "steps, expected",
    [
        # N = 4 pixels; point k changes floor(k * 4 / steps) pixels, removed in the order p1, p3, p2, p0
        (1, [210 / 211, 1 / 2]),  # counts 0, 4
        (2, [210 / 211, 10 / 11, 1 / 2]),  # counts 0, 2, 4: e^z = 210, 10, 1
        (3, [210 / 211, 70 / 71, 10 / 11, 1 / 2]),  # counts 0, 1, 2, 4 (floor(4/3) = 1, floor(8/3) = 2)
        # steps > N: counts floor(k / 2) = 0, 0, 1, 1, 2, 2, 3, 3, 4
        (8, [210 / 211, 210 / 211, 70 / 71, 70 / 71, 10 / 11, 10 / 11, 2 / 3, 2 / 3, 1 / 2]),
    ],
)
def test_pixel_counts_per_step(steps, expected):
    out = metrics.deletion_curve(linear_model(PRIMES), img(ONES), sal(SAL_1320), [0], steps=steps, baseline="zeros")
    assert_close(out, expect(expected), tag="metrics")


def test_mean_baseline_by_hand():
    # w = ln2 everywhere -> p = 2^s / (2^s + 1) with s the pixel sum. Image [0, 1, 2, 5]: s = 8;
    # its mean is 2. Saliency flat [0.3, 0.1, 0.2, 0.9] -> ranking p3, p0, p2, p1.
    model = linear_model([[LN2, LN2], [LN2, LN2]])
    x, s = img([[0.0, 1.0], [2.0, 5.0]]), sal([[0.3, 0.1], [0.2, 0.9]])
    deletion = metrics.deletion_curve(model, x, s, [0], steps=4, baseline="mean")
    # p3 5->2: [0,1,2,2] s=5; p0 0->2: [2,1,2,2] s=7; p2 2->2: s=7; p1 1->2: [2,2,2,2] s=8
    assert_close(deletion, expect([p2(8), p2(5), p2(7), p2(7), p2(8)]), tag="metrics")
    assert_close(deletion, expect([256 / 257, 32 / 33, 128 / 129, 128 / 129, 256 / 257]), tag="metrics")
    insertion = metrics.insertion_curve(model, x, s, [0], steps=4, baseline="mean")
    # from [2,2,2,2] (s=8): reveal p3=5 -> s=11; p0=0 -> s=9; p2=2 -> s=9; p1=1 -> s=8
    assert_close(insertion, expect([256 / 257, 2048 / 2049, 512 / 513, 512 / 513, 256 / 257]), tag="metrics")


def test_all_channels_of_a_pixel_change_together():
    # C = 3, w = ln2 on all 12 inputs. Per-pixel channel sums: p0 = 1, p1 = 1, p2 = 2, p3 = 3 (total 7).
    model = linear_model([LN2] * 12)
    x = img([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])
    s = sal([[0.0, 1.0], [2.0, 3.0]])  # ranking p3, p2, p1, p0
    deletion = metrics.deletion_curve(model, x, s, [0], steps=4, baseline="zeros")
    # s = 7, 7-3 = 4, 4-2 = 2, 2-1 = 1, 0
    assert_close(deletion, expect([128 / 129, 16 / 17, 4 / 5, 2 / 3, 1 / 2]), tag="metrics")
    insertion = metrics.insertion_curve(model, x, s, [0], steps=4, baseline="zeros")
    # s = 0, 3, 5, 6, 7
    assert_close(insertion, expect([1 / 2, 8 / 9, 32 / 33, 64 / 65, 128 / 129]), tag="metrics")


def test_mean_baseline_is_per_channel():
    # Same image; only channel 0 is read (w = ln2 there, 0 elsewhere). Channel 0 = [1, 0, 0, 2], its
    # mean 0.75 (the mean over all channels, 7/12, would give other numbers).
    model = linear_model([LN2] * 4 + [0.0] * 8)
    x = img([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])
    s = sal([[0.0, 1.0], [2.0, 3.0]])  # ranking p3, p2, p1, p0
    deletion = metrics.deletion_curve(model, x, s, [0], steps=4, baseline="mean")
    # channel-0 sum: 3; p3 2 -> .75: 1.75; p2 0 -> .75: 2.5; p1 0 -> .75: 3.25; p0 1 -> .75: 3
    assert_close(deletion, expect([p2(3), p2(1.75), p2(2.5), p2(3.25), p2(3)]), tag="metrics")


def test_blur_baseline_by_hand():
    # kernel 3 with sigma^2 = 1 / (2 ln 2): the taps are e^-ln2 = 1/2 around 1 -> [1/4, 1/2, 1/4].
    # Image [[0, 4], [8, 0]], replicate padding:
    #   rows:    [0, 4] padded [0,0,4,4] -> [0+0+1, 0+2+1] = [1, 3];  [8, 0] -> [2+4+0, 2+0+0] = [6, 2]
    #   columns: [1, 6] padded [1,1,6,6] -> [2.25, 4.75];             [3, 2] -> [2.75, 2.25]
    # blurred [[2.25, 2.75], [4.75, 2.25]]; both sums are 12. Pixel change blur - image:
    #   p0 +2.25, p1 -1.25, p2 -3.25, p3 +2.25.
    model = linear_model([[LN2, LN2], [LN2, LN2]])
    x = img([[0.0, 4.0], [8.0, 0.0]])
    s = sal([[0.9, 0.1], [0.5, 0.3]])  # ranking p0, p2, p3, p1
    opts = dict(steps=4, baseline="blur", blur_kernel_size=3, blur_sigma=math.sqrt(1 / (2 * LN2)))
    deletion = metrics.deletion_curve(model, x, s, [0], **opts)
    # 12, +2.25 = 14.25, -3.25 = 11, +2.25 = 13.25, -1.25 = 12
    assert_close(deletion, expect([p2(12), p2(14.25), p2(11), p2(13.25), p2(12)]), tag="metrics")
    insertion = metrics.insertion_curve(model, x, s, [0], **opts)
    # from the blur (12): reveal p0 -2.25 = 9.75, p2 +3.25 = 13, p3 -2.25 = 10.75, p1 +1.25 = 12
    assert_close(insertion, expect([p2(12), p2(9.75), p2(13), p2(10.75), p2(12)]), tag="metrics")


def test_default_blur_on_a_tiny_constant_image():
    # An 11x11 kernel on a 2x2 image (padding far larger than the image): a normalised kernel with
    # replicate padding leaves a constant image unchanged, so the insertion curve is flat.
    model = linear_model([[LN2, LN2], [LN2, LN2]])
    x = img([[0.5, 0.5], [0.5, 0.5]])  # s = 4 * 0.5 = 2 -> 2^2 / (2^2 + 1)
    insertion = metrics.insertion_curve(model, x, sal(SAL_1320), [0], steps=4)  # default baseline: blur
    assert_close(insertion, expect([4 / 5] * 5), tag="metrics")


@pytest.mark.parametrize("shape", [(), (1, 1, 1), (1, 1, 2, 2)])
def test_tensor_baseline(shape):
    # Black image, baseline 1 (broadcast from any shape): deleting the top pixels puts ones there.
    model = linear_model(PRIMES)
    x = img([[0.0, 0.0], [0.0, 0.0]])
    out = metrics.deletion_curve(model, x, sal(SAL_1320), [0], steps=4, baseline=torch.ones(shape, dtype=F64))
    # ranking p1 (3), p3 (7), p2 (5), p0 (2): e^z = 1, 3, 21, 105, 210
    assert_close(out, expect([1 / 2, 3 / 4, 21 / 22, 105 / 106, 210 / 211]), tag="metrics")


# --------------------------------------------------------------------------------------------
# Ranking: ties, resizing, dtypes


def test_ties_go_to_the_lower_flat_index():
    model = linear_model(PRIMES)
    flat = metrics.deletion_curve(model, img(ONES), sal([[0.5, 0.5], [0.5, 0.5]]), [0], steps=4, baseline="zeros")
    # all equal -> p0, p1, p2, p3: e^z = 210, 105, 35, 7, 1
    assert_close(flat, expect([210 / 211, 105 / 106, 35 / 36, 7 / 8, 1 / 2]), tag="metrics")
    pairs = metrics.deletion_curve(model, img(ONES), sal([[0.5, 0.9], [0.5, 0.9]]), [0], steps=4, baseline="zeros")
    # p1 = p3 > p0 = p2 -> p1, p3, p0, p2: e^z = 210, 70, 10, 5, 1
    assert_close(pairs, expect([210 / 211, 70 / 71, 10 / 11, 5 / 6, 1 / 2]), tag="metrics")


def test_small_saliency_is_resized_bilinearly():
    model = linear_model(PRIMES)
    # [1, 2] -> [2, 2]: both rows copy [1, 3] (weights 0.75/0.25 on one row, exact for these values),
    # so flat [1, 3, 1, 3] -> ranking p1, p3, p0, p2 (ties by index), as in the pairs case above.
    out = metrics.deletion_curve(model, img(ONES), torch.tensor([[[1.0, 3.0]]], dtype=F64), [0], steps=4,
                                 baseline="zeros")
    assert_close(out, expect([210 / 211, 70 / 71, 10 / 11, 5 / 6, 1 / 2]), tag="metrics")


def test_resize_matches_interpolating_by_hand(gen):
    model = small_net(gen)
    x = torch.rand((2, 3, 6, 6), generator=gen, dtype=F64)
    small = torch.rand((2, 3, 3), generator=gen, dtype=F64)
    big = F.interpolate(small[:, None], size=(6, 6), mode="bilinear", align_corners=False)[:, 0]
    for fn in (metrics.deletion_curve, metrics.insertion_curve):
        assert torch.equal(fn(model, x, small, steps=5), fn(model, x, big, steps=5))
    assert torch.equal(metrics.average_drop(model, x, small).per_image, metrics.average_drop(model, x, big).per_image)


def test_integer_saliency_and_float32():
    model = linear_model(PRIMES, dtype=torch.float32)
    x = img(ONES, dtype=torch.float32)
    out = metrics.deletion_curve(model, x, torch.tensor([[[1, 9], [4, 7]]]), [0], steps=4, baseline="zeros")
    assert out.dtype == torch.float32
    # float32: e^z is 210 etc. only to float32 rounding
    assert_close(out, expect([210 / 211, 70 / 71, 10 / 11, 2 / 3, 1 / 2], dtype=torch.float32), tag="metrics")


def test_targets_none_uses_the_predicted_class():
    # w = ln2: image A (s = 2) predicts class 0; image B (s = -2) predicts class 1.
    model = linear_model([[LN2, LN2], [LN2, LN2]])
    x = torch.cat([img([[1.0, 1.0], [0.0, 0.0]]), img([[-1.0, -1.0], [0.0, 0.0]])])
    s = sal(SAL_1320).repeat(2, 1, 1)
    for fn in (metrics.deletion_curve, metrics.insertion_curve):
        assert torch.equal(fn(model, x, s, None, steps=4), fn(model, x, s, torch.tensor([0, 1]), steps=4))
    ad_none, ad_explicit = metrics.average_drop(model, x, s), metrics.average_drop(model, x, s, [0, 1])
    assert torch.equal(ad_none.per_image, ad_explicit.per_image)
    # ranking p1, p3, p2, p0; A = [1, 1, 0, 0], zeros baseline: s = 2, 1, 1, 1, 0 for class 0
    assert_close(metrics.deletion_curve(model, x, s, steps=4, baseline="zeros")[:1],
                 expect([p2(2), p2(1), p2(1), p2(1), p2(0)]), tag="metrics")


# --------------------------------------------------------------------------------------------
# AUC


@pytest.mark.parametrize(
    "curve, expected",
    [
        ([1.0, 0.5, 0.0], 0.5),  # dx = 1/2: (1 + 0.5)/2 * 1/2 + (0.5 + 0)/2 * 1/2 = 0.375 + 0.125
        ([0.0, 1.0, 0.0, 1.0], 0.5),  # dx = 1/3: (0.5 + 0.5 + 0.5) / 3
        ([0.2, 0.4, 0.8, 0.6, 1.0], 0.6),  # dx = 1/4: (0.3 + 0.6 + 0.7 + 0.8) / 4
        ([0.3, 0.3], 0.3),  # a constant curve has its value as area
    ],
)
def test_auc_by_hand(curve, expected):
    assert_close(metrics.auc(torch.tensor([curve], dtype=F64)), torch.tensor([expected], dtype=F64), tag="auc")


def test_auc_batch_and_hand_curve():
    curves = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=F64)
    assert_close(metrics.auc(curves), torch.tensor([1.0, 0.5, 0.5], dtype=F64), tag="auc")
    # the hand deletion curve above: dx = 1/4, (v0 + vN)/2 + v1 + v2 + v3
    d = [210 / 211, 70 / 71, 10 / 11, 2 / 3, 1 / 2]
    got = metrics.auc(metrics.deletion_curve(linear_model(PRIMES), img(ONES), sal(SAL_1320), [0], steps=4,
                                             baseline="zeros"))
    assert_close(got, torch.tensor([((d[0] + d[4]) / 2 + d[1] + d[2] + d[3]) / 4], dtype=F64), tag="auc")
    assert metrics.auc(torch.empty((0, 5))).shape == (0,)


# --------------------------------------------------------------------------------------------
# Average drop and increase in confidence


def test_average_drop_and_increase_by_hand():
    # w = ln2 everywhere: Y = p2(sum x), O = p2(sum x * s01).
    model = linear_model([[LN2, LN2], [LN2, LN2]])
    x = torch.cat([
        img([[1.0, 1.0], [1.0, 1.0]]),    # A
        img([[2.0, 0.0], [0.0, 0.0]]),    # B
        img([[-1.0, 1.0], [0.0, 0.0]]),   # C
        img([[1.0, 1.0], [1.0, 1.0]]),    # D
    ])
    s = torch.cat([
        sal([[2.0, 4.0], [4.0, 4.0]]),    # A: min-max -> [0, 1, 1, 1]; E sum 3
        sal([[3.0, 1.0], [1.0, 1.0]]),    # B: -> [1, 0, 0, 0]; E = [2, 0, 0, 0], sum 2
        sal([[0.0, 1.0], [0.5, 0.5]]),    # C: unchanged; E = [0, 1, 0, 0], sum 1
        sal([[5.0, 5.0], [5.0, 5.0]]),    # D: constant -> all zeros; E sum 0
    ])
    y = torch.tensor([16 / 17, 4 / 5, 1 / 2, 16 / 17], dtype=F64)  # sums 4, 2, 0, 4
    o = torch.tensor([8 / 9, 4 / 5, 2 / 3, 1 / 2], dtype=F64)  # sums 3, 2, 1, 0
    # drop = max(0, Y - O) / Y * 100:
    #   A: (1 - (8/9)(17/16)) * 100 = (1 - 17/18) * 100 = 100/18;  B: O = Y -> 0;  C: O > Y -> 0
    #   D: (1 - (1/2)(17/16)) * 100 = (1 - 17/32) * 100 = 46.875
    drop = torch.tensor([100 / 18, 0.0, 0.0, 46.875], dtype=F64)
    ad = metrics.average_drop(model, x, s, [0, 0, 0, 0])
    assert_close(ad.original_prob, y, tag="confidence")
    assert_close(ad.explanation_prob, o, tag="confidence")
    assert_close(ad.per_image, drop, tag="confidence")
    assert ad.value == pytest.approx((100 / 18 + 46.875) / 4, rel=1e-12)
    inc = metrics.increase_in_confidence(model, x, s, [0, 0, 0, 0])
    # only C has O > Y (B's O == Y is not an increase): 1 of 4
    assert torch.equal(inc.per_image, torch.tensor([False, False, True, False]))
    assert inc.value == pytest.approx(25.0, rel=1e-12)
    assert torch.equal(inc.original_prob, ad.original_prob) and torch.equal(inc.explanation_prob, ad.explanation_prob)


def test_average_drop_resizes_then_normalises():
    model = linear_model([[LN2] * 6])
    x = img([[1.0] * 6])  # 1x6 ones: Y = p2(6) = 64/65
    # [1, 3] saliency [[0, 1, 0]] -> width 6, align_corners=False: source x = (i + 0.5) / 2 - 0.5 =
    # -0.25 (clamped to 0), 0.25, 0.75, 1.25, 1.75, 2.25 (clamped to 2) -> [0, 0.25, 0.75, 0.75, 0.25, 0].
    # Its max is 0.75, so min-max after resizing gives [0, 1/3, 1, 1, 1/3, 0] (E sum 8/3); normalising
    # before resizing would give sum 2.
    ad = metrics.average_drop(model, x, torch.tensor([[[0.0, 1.0, 0.0]]], dtype=F64), [0])
    assert_close(ad.explanation_prob, torch.tensor([p2(8 / 3)], dtype=F64), tag="confidence")
    assert_close(ad.per_image, torch.tensor([(1 - p2(8 / 3) / (64 / 65)) * 100], dtype=F64), tag="confidence")
    # [1, 2] -> [2, 2] only copies the row: [[0, 1]] gives E = [0, 1, 0, 1] (sum 2) on ones (sum 4):
    # Y = 16/17, O = 4/5: (1 - (4/5)(17/16)) * 100 = (1 - 68/80) * 100 = 15
    model = linear_model([[LN2, LN2], [LN2, LN2]])
    ad = metrics.average_drop(model, img(ONES), torch.tensor([[[0.0, 1.0]]], dtype=F64), [0])
    assert_close(ad.per_image, torch.tensor([15.0], dtype=F64), tag="confidence")


def test_average_drop_with_zero_confidence():
    # z = -1000: e^-1000 underflows, so Y == 0 exactly; a constant map gives E = 0 -> O = 1/2.
    # max(0, Y - O) / Y would be 0 / 0: defined as a drop of 0. O > Y counts as an increase.
    model = linear_model([[-1000.0]])
    x, s = img([[1.0]]), sal([[7.0]])
    ad = metrics.average_drop(model, x, s, [0])
    assert ad.original_prob.tolist() == [0.0] and ad.explanation_prob.tolist() == [0.5]
    assert ad.per_image.tolist() == [0.0] and ad.value == 0.0
    assert metrics.increase_in_confidence(model, x, s, [0]).value == 100.0


def test_faithfulness_report_by_hand():
    model = linear_model(PRIMES)
    report = metrics.faithfulness_report(model, img(ONES), sal(SAL_1320), [0], steps=4, insertion_baseline="zeros")
    d = [210 / 211, 70 / 71, 10 / 11, 2 / 3, 1 / 2]
    i = [1 / 2, 3 / 4, 21 / 22, 105 / 106, 210 / 211]
    trap = lambda c: ((c[0] + c[4]) / 2 + c[1] + c[2] + c[3]) / 4  # noqa: E731
    assert set(report) == {"deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence"}
    assert report["deletion_auc"] == pytest.approx(trap(d), rel=1e-12)
    assert report["insertion_auc"] == pytest.approx(trap(i), rel=1e-12)
    # saliency min-max [[0, 1], [0.375, 0.75]]: z = ln3 + 0.375 ln5 + 0.75 ln7 -> e^z = 3 * 5^0.375 * 7^0.75
    r = 3 * 5**0.375 * 7**0.75
    assert report["average_drop"] == pytest.approx((1 - (r / (r + 1)) / (210 / 211)) * 100, rel=1e-12)
    assert report["increase_in_confidence"] == 0.0


# --------------------------------------------------------------------------------------------
# Batching, chunking, the model left alone


def small_net(gen) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5)
    return net


def test_batched_equals_per_image(gen):
    model = small_net(gen)
    x = torch.rand((4, 3, 6, 6), generator=gen, dtype=F64)
    s = torch.rand((4, 3, 3), generator=gen, dtype=F64)
    t = torch.tensor([0, 3, 1, 4])
    for fn, kw in ((metrics.deletion_curve, dict(baseline="mean")), (metrics.insertion_curve, {})):
        batched = fn(model, x, s, t, steps=7, **kw)
        single = torch.cat([fn(model, x[i:i + 1], s[i:i + 1], t[i:i + 1], steps=7, **kw) for i in range(4)])
        assert_close(batched, single, tag="batched")
    ad = metrics.average_drop(model, x, s, t)
    single = torch.cat([metrics.average_drop(model, x[i:i + 1], s[i:i + 1], t[i:i + 1]).per_image for i in range(4)])
    assert_close(ad.per_image, single, tag="batched")


@pytest.mark.parametrize("batch_size", [1, 3, 7, 10_000])
def test_batch_size_chunking_changes_nothing(gen, batch_size):
    model = small_net(gen)
    x = torch.rand((3, 3, 6, 6), generator=gen, dtype=F64)
    s = torch.rand((3, 6, 6), generator=gen, dtype=F64)
    for fn in (metrics.deletion_curve, metrics.insertion_curve):
        assert_close(fn(model, x, s, steps=5, batch_size=batch_size), fn(model, x, s, steps=5), tag="chunked")
    for fn in (metrics.average_drop, metrics.increase_in_confidence):
        a, b = fn(model, x, s, batch_size=batch_size), fn(model, x, s)
        assert_close(a.original_prob, b.original_prob, tag="chunked")
        assert_close(a.explanation_prob, b.explanation_prob, tag="chunked")


class _Recorder(nn.Module):
    """Wraps a model and records the training flag and grad mode it was called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.inner(x)


@pytest.mark.parametrize("train", [False, True])
def test_model_is_left_alone(gen, train):
    inner = small_net(gen)
    inner.insert(1, nn.BatchNorm2d(4).to(F64))
    with torch.no_grad():  # non-trivial running stats, so an update would show
        inner[1].running_mean.uniform_(-1, 1, generator=gen)
    model = _Recorder(inner).train(train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand((2, 3, 6, 6), generator=gen, dtype=F64)
    x_before = x.clone()
    s = torch.rand((2, 3, 3), generator=gen, dtype=F64)
    if train:
        # train mode is the caller's choice and is kept (batch-norm then updates its stats, as it
        # would in any forward): only check the flags and that no gradient is taken.
        metrics.deletion_curve(model, x, s, steps=3)
    else:
        metrics.faithfulness_report(model, x, s, steps=3)
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.calls and all(c == (train, False) for c in model.calls)
    assert all(m.training == train for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert torch.equal(x, x_before)


def test_planted_model_ranks_perfect_above_reversed(gen):
    # Class 0 reads only four decisive pixels of an 8x8 image: z = 3 * (their sum) - 6.
    w = torch.zeros(8, 8, dtype=F64)
    w[1, 2] = w[3, 5] = w[6, 1] = w[6, 6] = 3.0
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2).to(F64))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([w.flatten(), torch.zeros(64, dtype=F64)]))
        model[1].bias.copy_(torch.tensor([-6.0, 0.0], dtype=F64))
    x = torch.rand((3, 1, 8, 8), generator=gen, dtype=F64) * 0.5 + 0.5
    perfect = w.expand(3, 8, 8)
    good = metrics.faithfulness_report(model, x, perfect, [0, 0, 0], steps=16, insertion_baseline="zeros")
    bad = metrics.faithfulness_report(model, x, -perfect, [0, 0, 0], steps=16, insertion_baseline="zeros")
    assert good["deletion_auc"] < bad["deletion_auc"]
    assert good["insertion_auc"] > bad["insertion_auc"]
    # per image too
    d = lambda s: metrics.auc(metrics.deletion_curve(model, x, s, [0, 0, 0], steps=16))  # noqa: E731
    assert bool((d(perfect) < d(-perfect)).all())


# --------------------------------------------------------------------------------------------
# Empty batch and bad input


def _never_called(x):
    raise AssertionError("the model must not be called on an empty batch")


@pytest.mark.parametrize("targets", [None, torch.empty(0, dtype=torch.long), []])
def test_empty_batch_gives_empty_results(targets):
    x, s = torch.empty((0, 3, 4, 4)), torch.empty((0, 2, 2))
    for fn in (metrics.deletion_curve, metrics.insertion_curve):
        out = fn(_never_called, x, s, targets, steps=4)
        assert out.shape == (0, 5) and out.dtype == torch.float32
    for fn in (metrics.average_drop, metrics.increase_in_confidence):
        r = fn(_never_called, x, s, targets)
        assert r.per_image.shape == (0,) and r.original_prob.shape == (0,) and math.isnan(r.value)
    report = metrics.faithfulness_report(_never_called, x, s, targets, steps=4)
    assert all(math.isnan(v) for v in report.values())


def _wrong_output(x):
    return torch.zeros(x.shape[0], 2, 1, dtype=x.dtype)


def _base_args():
    return dict(model=linear_model(PRIMES), images=img(ONES).repeat(2, 1, 1, 1),
                saliency=sal(SAL_1320).repeat(2, 1, 1), targets=torch.tensor([0, 1]))


# (change to the good arguments, exception, words the message must hold, applies to curves only)
BAD = {
    "model-not-callable": (dict(model=3), TypeError, "model", False),
    "model-output-shape": (dict(model=_wrong_output), ValueError, "model", False),
    "images-not-tensor": (dict(images=[[1.0]]), TypeError, "images", False),
    "images-ndim": (dict(images=torch.ones(2, 2, 2, dtype=F64)), ValueError, "images", False),
    "images-int": (dict(images=torch.ones(2, 1, 2, 2, dtype=torch.long)), TypeError, "images", False),
    "images-empty-hw": (dict(images=torch.ones(2, 1, 0, 2, dtype=F64)), ValueError, "images", False),
    "saliency-not-tensor": (dict(saliency=[[[1.0]]]), TypeError, "saliency", False),
    "saliency-ndim-2": (dict(saliency=torch.ones(2, 4, dtype=F64)), ValueError, "saliency", False),
    "saliency-ndim-4": (dict(saliency=torch.ones(2, 1, 2, 2, dtype=F64)), ValueError, "saliency", False),
    "saliency-batch": (dict(saliency=torch.ones(3, 2, 2, dtype=F64)), ValueError, "saliency batch 3", False),
    "saliency-empty-hw": (dict(saliency=torch.ones(2, 0, 5, dtype=F64)), ValueError, "cannot be resized", False),
    "saliency-nan": (dict(saliency=torch.tensor([[[0.0, float("nan")], [1.0, 2.0]]] * 2, dtype=F64)),
                     ValueError, "saliency must be finite", False),
    "saliency-inf": (dict(saliency=torch.tensor([[[0.0, float("inf")], [1.0, 2.0]]] * 2, dtype=F64)),
                     ValueError, "saliency must be finite", False),
    "targets-high": (dict(targets=torch.tensor([0, 2])), ValueError, "targets must be < num_classes = 2", False),
    "targets-negative": (dict(targets=torch.tensor([0, -1])), ValueError, "targets must be >= 0", False),
    "targets-length": (dict(targets=torch.tensor([0, 1, 1])), ValueError, r"targets must be \[B\] = \[2\]", False),
    "targets-2d": (dict(targets=torch.tensor([[0, 1]])), ValueError, "targets", False),
    "targets-float": (dict(targets=torch.tensor([0.0, 1.0])), TypeError, "targets", False),
    "targets-junk": (dict(targets="ab"), TypeError, "targets", False),
    "batch-size-0": (dict(batch_size=0), ValueError, "batch_size: expected a positive int", False),
    "steps-0": (dict(steps=0), ValueError, "steps: expected a positive int", True),
    "steps-float": (dict(steps=2.5), TypeError, "steps: expected a positive int", True),
    "steps-bool": (dict(steps=True), TypeError, "steps: expected a positive int", True),
    "baseline-name": (dict(baseline="noise"), ValueError, "baseline must be one of", True),
    "baseline-type": (dict(baseline=3), TypeError, "baseline", True),
    "baseline-shape": (dict(baseline=torch.ones(3, 3, dtype=F64)), ValueError, "baseline tensor of shape", True),
    "blur-kernel-even": (dict(baseline="blur", blur_kernel_size=4), ValueError, "blur_kernel_size", True),
    "blur-sigma-0": (dict(baseline="blur", blur_sigma=0.0), ValueError, "blur_sigma", True),
}

FUNCTIONS = {
    "deletion": metrics.deletion_curve,
    "insertion": metrics.insertion_curve,
    "average_drop": metrics.average_drop,
    "increase": metrics.increase_in_confidence,
    "report": metrics.faithfulness_report,
}


@pytest.mark.parametrize(
    "name, case",
    [(n, c) for c in BAD for n in FUNCTIONS if not (BAD[c][3] and n in ("average_drop", "increase"))],
)
def test_bad_input_raises_naming_the_argument(name, case):
    change, exc, words, _ = BAD[case]
    args = {**_base_args(), **change}
    if name == "report" and "baseline" in change:
        args["deletion_baseline"] = args.pop("baseline")
    fn = FUNCTIONS[name]
    with pytest.raises(exc, match=words):
        fn(args.pop("model"), args.pop("images"), args.pop("saliency"), args.pop("targets"), **args)


def test_auc_bad_input():
    with pytest.raises(ValueError, match="at least 2 points"):
        metrics.auc(torch.ones(3, 1))
    with pytest.raises(ValueError, match="at least 2 points"):
        metrics.auc(torch.tensor(1.0))
    with pytest.raises(TypeError, match="curve"):
        metrics.auc([1.0, 0.0])
