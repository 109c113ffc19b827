"""``penalize``: a loss term on where the model looks, trained through the differentiable CAM."""

from __future__ import annotations

import torch
from torch import nn

from i2x import ops
from i2x._internal.checks import check_number, describe
from i2x._internal.positions import row_table, rows_at
from i2x._internal.profiling import profiled
from i2x._internal.tensors import as_grid, at_least_float32
from i2x.explain.explainer import Explainer
from i2x.loop.strategies import mass_share
from i2x.loop.targets import Targets

__all__ = ["ExplanationPenalty"]


class ExplanationPenalty(nn.Module):
    """``weight * mean over the batch's targets of the share of the true class's CAM mass on the
    flagged prototypes' cells`` (0 for a batch without targets), differentiable through
    ``i2x.ops.cam``: the channel weights' own gradient (a second-order term) is kept, so the
    penalty trains the features and how the model weighs them ("right for the right reasons").

    In a loop::

        with penalty.explainer.capture() as captured:
            logits = model(x)
        loss = F.cross_entropy(logits, y) + penalty(captured, logits, y, indices)
    """

    def __init__(self, explainer: Explainer, targets: Targets, weight: float = 1.0):
        super().__init__()
        if not isinstance(explainer, Explainer):
            raise TypeError(f"explainer: expected an i2x.Explainer, got {describe(explainer)}")
        if not isinstance(targets, Targets):
            raise TypeError(f"targets: expected i2x Targets, got {describe(targets)}")
        self.explainer = explainer
        self.weight = check_number(weight, "weight", 0)
        rows = targets.selected.nonzero().flatten()
        n = int(targets.indices.max()) + 1 if targets.indices.numel() else 0
        self.row_of = row_table(targets.indices[rows], n)
        self.masks = targets.cell_masks[rows]

    @profiled("i2x::penalty")
    def forward(self, captured, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        rows, hit = rows_at(self.row_of, indices)
        if hit.numel() == 0 or self.weight == 0:
            return logits.new_zeros(())
        acts = captured.activations if hasattr(captured, "activations") else captured
        act = acts[0] if isinstance(acts, (list, tuple)) else acts
        device = logits.device
        hit_d = hit.to(device)
        scores = logits.gather(1, labels.to(device)[:, None])[:, 0][hit_d].sum()
        grad = torch.autograd.grad(scores, act, create_graph=True)[0]
        layer_names = self.explainer.layer_names
        if layer_names is None:  # as in Explainer.capture(), which the activations come from
            raise ValueError("penalty needs the layer named: construct the Explainer with layer=...")
        a = as_grid(act, layer_names[0], self.explainer.reshape)[hit_d]
        g = as_grid(grad, layer_names[0], self.explainer.reshape)[hit_d]
        cam = ops.cam(at_least_float32(a), at_least_float32(g), self.explainer.method, relu=True)
        mask = self.masks[rows[hit]].to(device)
        if tuple(mask.shape[1:]) != tuple(cam.shape[1:]):
            raise ValueError(f"ExplanationPenalty: the targets' cells are {tuple(mask.shape[1:])} but the layer's "
                             f"grid is {tuple(cam.shape[1:])}: the explainer's layer is not the one the targets "
                             "were found at")
        return self.weight * mass_share(cam, mask).mean()
