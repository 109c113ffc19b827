"""The literature baselines (i2x.loop.rrr, .jtt, .dfr), each on a tiny case where its paper says it works.

Truths: a per-sample, pure-torch input gradient for RRR's value; bit-identical weights against
plain training (weight 0, masks all false); counts of the positions a JTT epoch draws, against
``epoch_permutation``; the parameters DFR must not touch; worst-group and decoy-randomised test
accuracy on synthetic data with a known shortcut.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _loop import hand_targets, image_dataset, snapshot, state_equal, tiny_net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from i2x.data import ImageDataset
from i2x.loop import (
    RRRPenalty,
    dfr_retrain,
    evaluate,
    finetune,
    jtt_error_set,
    jtt_sampler,
)
from i2x.loop.strategies import OversampleSampler, epoch_permutation

# ----------------------------------------------------------------------------------------------
# Synthetic data with a known shortcut


def decoy_images(n: int, seed: int, decoy: bool = True) -> tuple[ImageDataset, torch.Tensor]:
    """Two classes of 8 x 8 noise images. The real signal is a fixed +-1 pattern in the centre 4 x 4,
    of sign ``2y - 1`` and amplitude 0.5 under unit noise: learnable, but noisy. The decoy is the
    top-left 2 x 2 corner set to ``2 * (2y - 1)``. With ``decoy=False`` the corner's sign is random
    (the test set). Returns the dataset and the corner mask ``[n, 1, 8, 8]``."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.zeros(8, 8)
    pattern[2:6, 2:6] = (torch.randint(0, 2, (4, 4), generator=torch.Generator().manual_seed(99)) * 2 - 1).float()
    y = torch.arange(n) % 2
    sign = (2 * y - 1).float()
    x = torch.randn(n, 1, 8, 8, generator=g) + 0.5 * sign[:, None, None, None] * pattern
    corner = sign if decoy else (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float()
    x[:, 0, :2, :2] = 2 * corner[:, None, None]
    mask = torch.zeros(n, 1, 8, 8, dtype=torch.bool)
    mask[:, :, :2, :2] = True
    return ImageDataset(x, y, ["a", "b"], "custom", "train"), mask


def mlp(seed: int, d: int = 64, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def gradient_share(model: nn.Module, data: ImageDataset, mask: torch.Tensor) -> float:
    """Share of the squared input gradient of the summed log-probabilities inside ``mask``."""
    x = data.images.clone().requires_grad_(True)
    g = torch.autograd.grad(F.log_softmax(model(x), 1).sum(), x)[0].pow(2)
    return float((g * mask).sum() / g.sum())


def spurious_features(n: int, seed: int, majority: float = 0.95) -> tuple[TensorDataset, torch.Tensor]:
    """Two classes, 6 features: a noisy core feature (``2y - 1`` plus unit noise), a clean spurious one
    (``2 * (2a - 1)``, with ``a == y`` for a ``majority`` share of the samples), 4 noise features.
    Groups ``2y + a``: 0 and 3 are the majority, 1 and 2 the minority."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    a = torch.where(torch.rand(n, generator=g) < majority, y, 1 - y)
    x = 0.5 * torch.randn(n, 6, generator=g)
    x[:, 0] = (2 * y - 1).float() + torch.randn(n, generator=g)
    x[:, 1] = 2 * (2 * a - 1).float() + 0.1 * torch.randn(n, generator=g)
    return TensorDataset(x, y), 2 * y + a


def worst_group(model: nn.Module, data: TensorDataset, groups: torch.Tensor) -> float:
    with torch.no_grad():
        p = model(data.tensors[0]).argmax(1)
    return min(float((p[groups == k] == data.tensors[1][groups == k]).double().mean()) for k in groups.unique())


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# ----------------------------------------------------------------------------------------------
# RRR


def test_rrr_moves_the_gradient_out_of_the_mask_and_beats_the_decoy():
    train, mask = decoy_images(400, 0)
    test, test_mask = decoy_images(1000, 1, decoy=False)
    plain, rrr = mlp(0), mlp(0)
    recipe = {"epochs": 10, "lr": 0.05, "batch_size": 32, "precision": "fp32"}
    finetune(plain, train, **recipe)
    stats = finetune(rrr, train, penalty=RRRPenalty(mask, 10.0, dataset=train), **recipe)
    assert stats.mean_penalty > 0
    share_plain, share_rrr = gradient_share(plain, test, test_mask), gradient_share(rrr, test, test_mask)
    acc_plain, acc_rrr = evaluate(plain, test)["accuracy"], evaluate(rrr, test)["accuracy"]
    # measured: share 0.71 -> 0.0001, accuracy 0.49 -> 0.96
    assert share_plain > 0.3 and share_rrr < 0.05 * share_plain, (share_plain, share_rrr)
    assert acc_rrr > acc_plain + 0.25 and acc_rrr > 0.85, (acc_plain, acc_rrr)


def test_rrr_value_equals_a_per_sample_hand_computation():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    x = torch.randn(6, 2, 5, 5)
    positions = torch.tensor([7, 2, 9, 0, 4, 5])
    masks = torch.rand(10, 1, 5, 5, generator=torch.Generator().manual_seed(1)) < 0.4
    masks[9] = False  # one sample of the batch without a mask still counts in the batch mean
    penalty = RRRPenalty(masks, 2.5)
    xi = x.clone().requires_grad_(True)
    value = penalty(xi, model(xi), torch.zeros(6, dtype=torch.int64), positions)
    # By hand: one sample at a time, d/dx sum_c log p_c, squared on the mask, summed; the mean over all 6.
    terms = []
    for k in range(6):
        xk = x[k:k + 1].clone().requires_grad_(True)
        g = torch.autograd.grad(torch.log_softmax(model(xk), 1).sum(), xk)[0][0]
        terms.append((g[masks[positions[k]].expand_as(g)] ** 2).sum())
    expected = 2.5 * torch.stack(terms).sum() / 6
    assert value.item() > 0
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    # and it is differentiable in the parameters (double backward)
    value.backward()
    assert model[0].weight.grad is not None and bool(model[0].weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_rrr_weight_zero_is_plain_training_bit_for_bit(precision):
    data = image_dataset(64, 3, seed=0, signal=1.0)
    masks = torch.rand(64, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.3
    start = tiny_net(seed=2)
    plain, zero, on = fresh_copy(start), fresh_copy(start), fresh_copy(start)
    recipe = {"epochs": 2, "lr": 0.05, "batch_size": 16, "seed": 1, "precision": precision}
    finetune(plain, data, **recipe)
    stats = finetune(zero, data, penalty=RRRPenalty(masks, 0.0), **recipe)
    finetune(on, data, penalty=RRRPenalty(masks, 100.0), **recipe)
    assert stats.mean_penalty == 0
    assert state_equal(snapshot(plain), snapshot(zero))
    assert not state_equal(snapshot(plain), snapshot(on))  # positive control: the weight does act


def test_rrr_masks_all_false_give_zero_penalty_and_plain_training():
    data = image_dataset(48, 3, seed=0, signal=1.0)
    none = torch.zeros(48, 1, 8, 8, dtype=torch.bool)
    x = data.images[:5].clone().requires_grad_(True)
    model = tiny_net(seed=0)
    assert RRRPenalty(none, 1e6)(x, model(x), data.labels[:5], torch.arange(5)).item() == 0
    one = none.clone()
    one[3, 0, 4, 4] = True  # positive control: a single masked pixel makes it positive
    assert RRRPenalty(one, 1e6)(x, model(x), data.labels[:5], torch.arange(5)).item() > 0
    start = tiny_net(seed=1)
    plain, masked = fresh_copy(start), fresh_copy(start)
    finetune(plain, data, epochs=1, lr=0.05, batch_size=16, precision="fp32")
    stats = finetune(masked, data, epochs=1, lr=0.05, batch_size=16, precision="fp32",
                     penalty=RRRPenalty(none, 1e6))
    assert stats.mean_penalty == 0 and state_equal(snapshot(plain), snapshot(masked))


def test_rrr_runs_under_bfloat16_autocast():
    """Double backward under CPU bfloat16 autocast: the value is within a few percent of float32, and
    training with it works and differs from training without it."""
    data = image_dataset(64, 3, seed=0, signal=1.0)
    masks = torch.zeros(64, 8, 8, dtype=torch.bool)
    masks[:, :3, :3] = True
    model = tiny_net(seed=0, bn=False)
    penalty = RRRPenalty(masks, 1.0)
    values = {}
    for name, on in (("fp32", False), ("bf16", True)):
        x = data.images[:16].clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            logits = model(x)
        values[name] = penalty(x, logits.float(), data.labels[:16], torch.arange(16))
        values[name].backward()
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        model.zero_grad()
    assert values["fp32"].item() > 0
    torch.testing.assert_close(values["bf16"], values["fp32"], rtol=0.1, atol=0)
    plain, rrr = tiny_net(seed=0), tiny_net(seed=0)
    finetune(plain, data, epochs=1, lr=0.05, batch_size=16, precision="bf16")
    stats = finetune(rrr, data, epochs=1, lr=0.05, batch_size=16, precision="bf16", penalty=RRRPenalty(masks, 100.0))
    assert stats.precision == "bf16" and stats.mean_penalty > 0 and torch.isfinite(torch.tensor(stats.mean_loss))
    assert not state_equal(snapshot(plain), snapshot(rrr))


def test_rrr_from_targets_masks_the_flagged_pixels_of_the_targets_only():
    data = image_dataset(40, 3, seed=0)
    targets = hand_targets(data)
    penalty = RRRPenalty.from_targets(targets, data, weight=3.0)
    rows = targets.selected.nonzero().flatten()
    expected = targets.masks_for(rows)
    for k, pos in enumerate(targets.indices[rows].tolist()):
        assert torch.equal(penalty.masks[int(penalty.row_of[pos]), 0], expected[k])
    others = torch.ones(len(data), dtype=torch.bool)
    others[targets.indices[rows]] = False
    assert bool((penalty.row_of[others[:penalty.row_of.numel()]] == -1).all())
    assert penalty.weight == 3.0
    # positions past the last target have no mask and no penalty (they are not misaligned)
    x = data.images[-3:].clone().requires_grad_(True)
    model = tiny_net(seed=0)
    late = torch.arange(len(data) - 3, len(data))
    if bool((late >= penalty.row_of.numel()).all()):
        assert penalty(x, model(x), data.labels[-3:], late).item() == 0


def test_rrr_bad_input_is_refused_naming_the_argument():
    data = image_dataset(20, 3, seed=0)
    good = torch.zeros(20, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="masks: expected one mask per training sample"):
        RRRPenalty(torch.zeros(19, 8, 8, dtype=torch.bool), dataset=data)
    with pytest.raises(ValueError, match="masks: expected"):
        RRRPenalty(torch.zeros(20, 7, 8, dtype=torch.bool), dataset=data)
    with pytest.raises(ValueError, match="masks: expected"):
        RRRPenalty(torch.zeros(20, 3, 8, 8, dtype=torch.bool), dataset=data)  # 3 channels on 1-channel images
    with pytest.raises(ValueError, match="masks"):
        RRRPenalty(torch.zeros(20, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="masks"):
        RRRPenalty(good.float())
    with pytest.raises(ValueError, match="weight"):
        RRRPenalty(good, float("nan"))
    with pytest.raises(ValueError, match="weight"):
        RRRPenalty(good, -1.0)
    with pytest.raises(TypeError, match="weight"):
        RRRPenalty(good, "1")
    with pytest.raises(ValueError, match="indices"):
        RRRPenalty(good[:3], indices=torch.tensor([1, 1, 2]))
    with pytest.raises(ValueError, match="indices"):
        RRRPenalty(good[:3], indices=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="indices"):
        RRRPenalty(good[:3], indices=torch.tensor([0, 1, 25]), dataset=data)
    short = RRRPenalty(torch.ones(10, 8, 8, dtype=torch.bool))  # a training set of 20: misaligned
    with pytest.raises(ValueError, match="indices: dataset position"):
        finetune(tiny_net(), data, epochs=1, batch_size=20, precision="fp32", penalty=short)
    with pytest.raises(ValueError, match="dataset positions"):
        finetune(tiny_net(), DataLoader(data, batch_size=4), precision="fp32", penalty=RRRPenalty(good))
    x = data.images[:2]
    with pytest.raises(ValueError, match="requires_grad"):
        RRRPenalty(torch.ones(20, 8, 8, dtype=torch.bool))(x, tiny_net()(x), data.labels[:2], torch.arange(2))


# ----------------------------------------------------------------------------------------------
# JTT


def test_jtt_sampler_draws_each_error_lambda_up_times_in_the_shared_order():
    n, errors, lam = 50, torch.tensor([3, 17, 18, 40]), 6
    sampler = jtt_sampler(range(n), errors, lam, seed=4)
    assert len(sampler) == n + (lam - 1) * errors.numel()
    is_error = torch.zeros(n, dtype=torch.bool)
    is_error[errors] = True
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = torch.as_tensor(list(sampler))
        counts = torch.bincount(order, minlength=n)
        assert bool((counts[errors] == lam).all()) and bool((counts[~is_error] == 1).all())
        base = epoch_permutation(n, 4, epoch)
        assert torch.equal(order[~is_error[order]], base[~is_error[base]])  # the non-errors keep the shared order
        again = jtt_sampler(range(n), errors, lam, seed=4)
        again.set_epoch(epoch)
        assert torch.equal(torch.as_tensor(list(again)), order)  # same seed, same order
    other = jtt_sampler(range(n), errors, lam, seed=5)
    assert not torch.equal(torch.as_tensor(list(other)), torch.as_tensor(list(jtt_sampler(range(n), errors, lam, 4))))


def test_jtt_without_errors_or_upweighting_is_the_plain_order():
    for errors, lam in ((torch.zeros(0, dtype=torch.int64), 20), (torch.tensor([1, 2]), 1)):
        sampler = jtt_sampler(range(30), errors, lam, seed=2)
        sampler.set_epoch(3)
        assert torch.equal(torch.as_tensor(list(sampler)), epoch_permutation(30, 2, 3))
    mask = torch.zeros(30, dtype=torch.bool)
    mask[[4, 9]] = True
    counts = torch.bincount(torch.as_tensor(list(jtt_sampler(range(30), mask, 3))), minlength=30)
    assert counts[4] == 3 and counts[9] == 3 and counts.sum() == 34


def test_jtt_error_set_is_the_models_mistakes_in_eval_mode():
    data = image_dataset(70, 3, seed=0, signal=0.5)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    torch.manual_seed(0)
    finetune(model, data, epochs=1, lr=0.05, batch_size=16, precision="fp32")
    model.train()
    errors = jtt_error_set(model, data, batch_size=8)
    assert model.training and all(m.training for m in model.modules())  # flags put back
    with torch.no_grad():
        wrong = (model.eval()(data.images).argmax(1) != data.labels).nonzero().flatten()
    assert 0 < errors.numel() < 70 and torch.equal(errors, wrong)
    assert torch.equal(jtt_error_set(model, data, batch_size=512), errors)


def test_jtt_raises_worst_group_accuracy_over_plain_finetuning_with_the_same_budget():
    train, train_groups = spurious_features(1000, 0)
    test, test_groups = spurious_features(2000, 1, majority=0.5)
    erm = mlp(0, d=6)
    recipe = {"lr": 0.05, "batch_size": 64, "precision": "fp32"}
    finetune(erm, train, epochs=3, **recipe)
    errors = jtt_error_set(erm, train)
    minority = (train_groups == 1) | (train_groups == 2)
    assert errors.numel() > 0 and float(minority[errors].double().mean()) > 0.5  # errors find the minority
    jtt, plain = fresh_copy(erm), fresh_copy(erm)
    sampler = jtt_sampler(train, errors, 20, seed=0)
    # the control sees as many samples per epoch, the extra ones drawn from the whole set
    control = OversampleSampler(len(train), torch.arange(len(train)), len(sampler) - len(train), seed=0,
                                replacement=True)
    finetune(jtt, train, epochs=2, sampler=sampler, **recipe)
    stats = finetune(plain, train, epochs=2, sampler=control, **recipe)
    assert stats.samples == 2 * len(sampler)
    before, wg_plain, wg_jtt = (worst_group(m, test, test_groups) for m in (erm, plain, jtt))
    # measured: 0.32 (ERM), 0.34 (plain), 0.80 (JTT)
    assert before < 0.5 and wg_plain < 0.5 and wg_jtt > wg_plain + 0.25, (before, wg_plain, wg_jtt)


def test_jtt_bad_input_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="lambda_up"):
        jtt_sampler(range(10), torch.tensor([1]), 0)
    with pytest.raises(TypeError, match="lambda_up"):
        jtt_sampler(range(10), torch.tensor([1]), 2.5)
    with pytest.raises(ValueError, match="errors"):
        jtt_sampler(range(10), torch.tensor([1, 10]), 2)
    with pytest.raises(ValueError, match="errors"):
        jtt_sampler(range(10), torch.tensor([1, 1]), 2)
    with pytest.raises(ValueError, match="errors"):
        jtt_sampler(range(10), torch.zeros(9, dtype=torch.bool), 2)
    with pytest.raises(TypeError, match="errors"):
        jtt_sampler(range(10), torch.tensor([1.0]), 2)
    with pytest.raises(TypeError, match="model"):
        jtt_error_set("model", image_dataset(4))
    with pytest.raises(ValueError, match="batch_size"):
        jtt_error_set(tiny_net(), image_dataset(4), batch_size=0)


# ----------------------------------------------------------------------------------------------
# DFR


def test_dfr_raises_worst_group_accuracy_and_changes_only_the_last_layer():
    train, _ = spurious_features(1000, 0)
    held_out, held_out_groups = spurious_features(1000, 2)
    test, test_groups = spurious_features(2000, 1, majority=0.5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    finetune(model, train, epochs=5, lr=0.05, batch_size=64, precision="fp32")
    before_state = snapshot(model)
    before = worst_group(model.eval(), test, test_groups)
    info = dfr_retrain(model, held_out, held_out_groups, seed=0)
    after = worst_group(model.eval(), test, test_groups)
    # measured: 0.27 -> 0.77
    assert before < 0.5 and after > before + 0.25, (before, after)
    assert info["layer"] == "3" and info["features"] == 16 and info["per_group"] == min(info["groups"].values())
    after_state = snapshot(model)
    for k in before_state:
        same = torch.equal(before_state[k], after_state[k])
        assert same != k.startswith("3."), k  # every other parameter and buffer bit-identical


def test_dfr_fits_a_multiclass_last_layer():
    """Three classes (the multinomial fit): a scrambled last layer on separable features is restored."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 4, generator=g) * 0.3
    x[torch.arange(300), y] += 2.0
    # features of very different scales and offsets: the standardisation must be folded in exactly
    x = x * torch.tensor([0.01, 1.0, 100.0, 5.0]) + torch.tensor([3.0, -2.0, 50.0, 0.0])
    data = TensorDataset(x, y)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Identity(), nn.Linear(4, 3))
    with torch.no_grad():  # every class scored as the next one: accuracy 0
        model[1].weight.copy_(torch.eye(4)[[1, 2, 0]] / torch.tensor([0.01, 1.0, 100.0, 5.0]))
        model[1].bias.zero_()
    acc_before = float((model(x).argmax(1) == y).double().mean())
    info = dfr_retrain(model, data, y, subsamples=2)
    acc_after = float((model(x).argmax(1) == y).double().mean())
    assert acc_after > 0.95 and acc_after > acc_before + 0.3 and info["balanced_accuracy"] > 0.95


class _NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        return x @ self.w


class _ScaledOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return 2 * self.fc(x)


def test_dfr_refuses_a_model_without_a_final_linear_and_bad_groups():
    data = TensorDataset(torch.randn(20, 4), torch.arange(20) % 2)
    groups = torch.arange(20) % 4
    with pytest.raises(ValueError, match="no torch.nn.Linear"):
        dfr_retrain(_NoLinear(), data, groups)
    with pytest.raises(ValueError, match="not the output of an nn.Linear"):
        dfr_retrain(_ScaledOutput(), data, groups)
    with pytest.raises(ValueError, match="not the output of an nn.Linear"):
        dfr_retrain(nn.Sequential(nn.Linear(4, 2), nn.ReLU()), data, groups)
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="groups"):
        dfr_retrain(model, data, groups[:19])
    with pytest.raises(TypeError, match="groups"):
        dfr_retrain(model, data, groups.float())
    with pytest.raises(ValueError, match="classes"):
        dfr_retrain(nn.Sequential(nn.Linear(4, 3)), data, groups)
    with pytest.raises(ValueError, match="C"):
        dfr_retrain(model, data, groups, C=0)
    with pytest.raises(TypeError, match="model"):
        dfr_retrain("model", data, groups)
