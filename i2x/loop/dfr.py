"""DFR-style last-layer retraining (Kirichenko, Izmailov and Wilson, ICLR 2023, "Last layer
re-training is sufficient for robustness to spurious correlations"): a literature baseline. The
features stay frozen. Only the final ``nn.Linear`` is refit, on a group-balanced held-out set.

The original needs group labels (class x spurious attribute) on that held-out set. Here the groups
are an argument: true groups for an oracle, or groups i2x found (for example class x "a flagged
prototype is present").

As in the original: penultimate features are standardised, and an L1-regularised logistic regression
(scikit-learn) is fit on ``subsamples`` random group-balanced subsets, each group cut to the smallest
group's size. The coefficients are averaged, and the standardisation is folded into the layer's
weights.
"""

from __future__ import annotations

import torch
from torch import nn

from i2x._internal.checks import check_int, check_number, describe
from i2x._internal.modules import checked_forward, eval_mode, run_device, unwrap_model
from i2x.data import batch_of, labels_of
from i2x.track.batchnorm import recalibrated_batchnorm

__all__ = ["DFR_C", "DFR_SUBSAMPLES", "dfr_retrain", "final_linear"]

#: Inverse L1 strength. The original picks C from {1, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01} on
#: validation worst-group accuracy. 1 is the weakest of those, a safe start on few features.
DFR_C = 1.0
#: Balanced subsets averaged, as in the original (10).
DFR_SUBSAMPLES = 10


def final_linear(model: nn.Module, images: torch.Tensor) -> tuple[str, nn.Linear]:
    """``(name, layer)``: the ``nn.Linear`` whose output is the model's output, found by running
    ``model`` on ``images`` (a small batch) in eval mode. ValueError when the model has no
    ``nn.Linear``, when something runs after its last one, or when that layer runs more than once
    per forward pass. DFR refits that layer on its input, which must then be the penultimate
    features."""
    module = unwrap_model(model)
    names: dict[nn.Module, str] = {m: name for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    if not names:
        raise ValueError("model: has no torch.nn.Linear layer; last-layer retraining refits the final Linear")
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((m, o))) for m in names]
    try:
        with eval_mode(module), torch.no_grad():
            out = checked_forward(module, images, "images")
    finally:
        for h in hooks:
            h.remove()
    last = [m for m, o in calls if o is out or (o.shape == out.shape and torch.equal(o, out))]
    if not last:
        raise ValueError("model: its output is not the output of an nn.Linear (something runs after its last "
                         "Linear layer); last-layer retraining needs the final layer to be an nn.Linear on the "
                         "penultimate features")
    layer = last[-1]
    assert isinstance(layer, nn.Linear)  # only Linear layers were hooked
    if sum(m is layer for m, _ in calls) > 1:
        raise ValueError(f"model: its final Linear ({names[layer]}) runs more than once per forward pass, so its "
                         "input is not one set of penultimate features")
    return names[layer], layer


def _features(module: nn.Module, layer: nn.Module, dataset, batch_size: int, device) -> torch.Tensor:
    """``[N, D]`` float32: the input of ``layer`` for every sample of ``dataset``, in eval mode."""
    feats: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda m, i, o: feats.append(i[0].detach().float().cpu()))
    try:
        with eval_mode(module), torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                x, _ = batch_of(dataset, torch.arange(start, min(len(dataset), start + batch_size)))
                checked_forward(module, x.to(device), "images")
    finally:
        hook.remove()
    f = torch.cat(feats)
    if f.dim() != 2:
        raise ValueError(f"model: the input of its final Linear has shape {list(f.shape[1:])} per sample, not a "
                         "feature vector; last-layer retraining needs [batch, features]")
    return f


def dfr_retrain(model: nn.Module, dataset, groups, *, C: float = DFR_C, subsamples: int = DFR_SUBSAMPLES,
                seed: int = 0, batch_size: int = 512, device=None, calibration: torch.Tensor | None = None,
                max_iter: int = 1000) -> dict:
    """Refit the final ``nn.Linear`` of ``model`` in place on a group-balanced subset of ``dataset``.
    Every other parameter and buffer stays as it was.

    Args:
        dataset: held-out ``(image, label)`` samples, not the set the features were trained on. Its labels
            must cover every output class of the layer.
        groups: ``[len(dataset)]`` integer group of each sample (for example ``class * 2 + has_decoy``).
            Each balanced subset draws, from every group present, as many samples as the smallest
            group holds.
        C: inverse strength of the L1 penalty (scikit-learn's ``C``, default :data:`DFR_C`).
        subsamples: balanced subsets whose fits are averaged (default :data:`DFR_SUBSAMPLES`).
        seed: the subsets' draw.
        calibration: images to recompute BatchNorm statistics on before reading the features (restored
            afterwards), as in ``i2x.evaluate``; None uses the model's own.

    Returns ``{"layer", "features", "groups" {group: count}, "per_group", "subsamples", "C",
    "balanced_accuracy"}`` (the refit layer's accuracy on the union of the balanced subsets).
    """
    from sklearn.linear_model import LogisticRegression  # heavy import, only needed here

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    C = check_number(C, "C", 0, low_open=True)
    subsamples = check_int(subsamples, "subsamples")
    batch_size = check_int(batch_size, "batch_size")
    max_iter = check_int(max_iter, "max_iter")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset: the held-out set is empty")
    groups = torch.as_tensor(groups)
    if groups.is_floating_point() or groups.dtype == torch.bool or groups.dim() != 1:
        raise TypeError(f"groups: expected a 1-D integer tensor (one group per sample), got {describe(groups)}")
    if groups.numel() != n:
        raise ValueError(f"groups: expected one group per sample of the dataset ({n}), got {groups.numel()}")
    module = unwrap_model(model)
    device = run_device(module, device)
    labels = labels_of(dataset)
    with recalibrated_batchnorm(module, calibration, device):
        name, layer = final_linear(module, batch_of(dataset, torch.arange(min(n, 2)))[0].to(device))
        feats = _features(module, layer, dataset, batch_size, device)
    classes = layer.out_features
    present = labels.unique()
    if classes < 2 or present.numel() != classes or not bool((present == torch.arange(classes)).all()):
        raise ValueError(f"dataset: the held-out labels must cover every one of the final layer's {classes} classes, "
                         f"got {present.tolist()}")

    # Standardise on the whole held-out set (the original's scaler), then fold it into the layer.
    fit_intercept = layer.bias is not None
    # Without a bias there is nowhere to fold the centring into: scale only.
    mean = feats.mean(0) if fit_intercept else torch.zeros(feats.shape[1])
    std = feats.std(0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    z = ((feats - mean) / std).double().numpy()
    names, counts = groups.unique(return_counts=True)
    per_group = int(counts.min())
    members = [(groups == g).nonzero().flatten() for g in names]
    g = torch.Generator().manual_seed(int(seed))
    coef = torch.zeros(classes, feats.shape[1], dtype=torch.float64)
    intercept = torch.zeros(classes, dtype=torch.float64)
    used = torch.zeros(n, dtype=torch.bool)
    for _ in range(subsamples):
        rows = torch.cat([m[torch.randperm(m.numel(), generator=g)[:per_group]] for m in members]).sort().values
        used[rows] = True
        y = labels[rows]
        if y.unique().numel() != classes:
            raise ValueError(f"groups: a balanced subset of {per_group} per group lacks some of the {classes} classes; "
                             "every class needs a group with samples")
        # liblinear is the original's solver (binary); saga fits the multinomial L1 problem.
        clf = LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear" if classes == 2 else "saga",
                                 fit_intercept=fit_intercept, max_iter=max_iter, random_state=int(seed))
        clf.fit(z[rows.numpy()], y.numpy())
        w = torch.as_tensor(clf.coef_, dtype=torch.float64)
        b = torch.as_tensor(clf.intercept_, dtype=torch.float64) if fit_intercept else torch.zeros(w.shape[0])
        if classes == 2:  # one logit difference: split it symmetrically over the two outputs
            w, b = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2]).double()
        coef += w / subsamples
        intercept += b / subsamples
    # logits = coef @ (x - mean) / std + intercept  ==  (coef / std) @ x + (intercept - coef @ (mean / std))
    weight = coef / std.double()
    bias = intercept - coef @ (mean.double() / std.double())
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))
    zt = torch.as_tensor(z[used.numpy()])
    balanced_acc = float(((zt @ coef.T + intercept).argmax(1) == labels[used]).double().mean())
    return {"layer": name, "features": int(feats.shape[1]),
            "groups": {int(k): int(c) for k, c in zip(names, counts, strict=True)}, "per_group": per_group,
            "subsamples": subsamples, "C": C, "balanced_accuracy": balanced_acc}
