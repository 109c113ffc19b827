"""RRR, "right for the right reasons" (Ross, Hughes and Doshi-Velez, IJCAI 2017): a literature
baseline for the explanation penalty. The loss term is the squared input gradient of the summed
log-probabilities on the pixels a mask marks as irrelevant.

It plugs into ``i2x.finetune(..., penalty=RRRPenalty(...))`` as :class:`ExplanationPenalty` does.
Its attribute ``wants_input_gradient`` asks the loop for the batch's input with
``requires_grad=True`` instead of the captured activations::

    x.requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, y) + penalty(x, logits, y, indices)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from i2x._internal.checks import check_number, describe
from i2x._internal.positions import row_table, rows_at
from i2x.data import batch_of
from i2x.loop.targets import Targets

__all__ = ["RRRPenalty", "RRR_WEIGHT"]

#: The default ``weight`` (lambda). The paper picks lambda so that the cross-entropy and the penalty
#: have similar magnitudes. For its MLP on Decoy-MNIST pixels, trained with Adam, that was 1000. Both
#: of its terms are batch sums and both here are batch means, so a lambda means the same in both.
#: The input gradient's scale depends on the model and on how the inputs are normalised, though. Measured on i2x's
#: small ResNet (widths 8/16/32) on ``digits`` (standardised inputs, 4 columns masked), one epoch
#: of ``finetune`` at its default lr: weight 1 gave a penalty of 2% of the cross-entropy (0.037 vs
#: 1.94). 1000 gave twice the cross-entropy (5.8 vs 2.7), and test accuracy fell from 0.61 to 0.03.
#: 10 puts the terms within an order of magnitude of each other. Compare ``FitStats.mean_penalty``
#: with ``mean_loss``, and tune on validation data.
RRR_WEIGHT = 10.0


class RRRPenalty(nn.Module):
    """``weight * mean over the batch of sum over masked input values of
    (d/dx sum_c log p_c)^2``, where the mean runs over every sample of the batch, masked or not.

    The batch mean keeps the term's scale independent of the batch size, and matches the
    cross-entropy, which ``finetune`` also averages over the batch. The paper sums both terms over
    the batch, so its lambda carries over unchanged.

    Args:
        masks: bool ``[N, H, W]``, ``[N, 1, H, W]`` or ``[N, C, H, W]``. True marks an irrelevant
            input value, one whose gradient is penalised. A single channel applies to every
            channel of the image. Without ``indices``, row ``i`` is the mask of training dataset
            position ``i`` and ``N == len(dataset)``. With ``indices [N]``, row ``k`` is the mask
            of position ``indices[k]``, and every other position has no mask.
        weight: lambda, ``>= 0`` (default :data:`RRR_WEIGHT`). At 0, the loss is plain cross-entropy.
        indices: the dataset positions of the masks' rows, or None (see ``masks``).
        dataset: the training set. When given, the masks are checked against its length and image
            size when the penalty is built rather than at the first batch.

    Precision: the input gradient and its own gradient (double backward) are taken in the precision
    of the loop's forward pass. Under ``finetune``'s default bfloat16 autocast on the CPU that is
    bfloat16 for convolutions and matrix products; the penalty's value is within a few percent of
    float32. Pass ``precision="fp32"`` to ``finetune`` for the exact term.
    """

    #: ``fit`` hands this term the input tensor (requires_grad=True), not captured activations.
    wants_input_gradient = True

    def __init__(self, masks: torch.Tensor, weight: float = RRR_WEIGHT, *, indices=None, dataset=None):
        super().__init__()
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
            raise TypeError(f"masks: expected a bool tensor [N, H, W] or [N, C, H, W], got {describe(masks)}")
        if masks.dim() == 3:
            masks = masks[:, None]
        if masks.dim() != 4:
            raise ValueError(f"masks: expected a bool tensor [N, H, W] or [N, C, H, W], got {describe(masks)}")
        self.weight = check_number(weight, "weight", 0)
        if indices is None:
            n = masks.shape[0]
            positions = torch.arange(n)
        else:
            positions = torch.as_tensor(indices)
            if positions.dtype not in (torch.int64, torch.int32) or positions.dim() != 1:
                raise TypeError(f"indices: expected a 1-D integer tensor of dataset positions, got {describe(indices)}")
            positions = positions.long()
            if positions.numel() != masks.shape[0]:
                raise ValueError(f"indices: expected one position per mask ({masks.shape[0]}), got {positions.numel()}")
            if positions.numel() and int(positions.min()) < 0:
                raise ValueError("indices: dataset positions must be >= 0")
            if positions.unique().numel() != positions.numel():
                raise ValueError("indices: each dataset position may have one mask")
            n = int(positions.max()) + 1 if positions.numel() else 0
        if dataset is not None:
            self._check_against(masks, positions, n, dataset, given_indices=indices is not None)
        # Only the rows that mask something are kept; a batch without any of them costs no
        # double backward (as ExplanationPenalty skips batches without targets).
        keep = masks.flatten(1).any(1)
        self.aligned = indices is None  # a position past the masks is then a misaligned dataset
        self.row_of = row_table(positions[keep], n)
        self.masks = masks[keep]

    @staticmethod
    def _check_against(masks: torch.Tensor, positions: torch.Tensor, n: int, dataset, given_indices: bool) -> None:
        size = len(dataset)
        if not given_indices and n != size:
            raise ValueError(f"masks: expected one mask per training sample ({size}), got {n}: pass indices= "
                             "for masks of some positions only")
        if n > size:
            raise ValueError(f"indices: position {n - 1} is beyond the dataset's {size} samples")
        if size == 0:
            return
        image = batch_of(dataset, torch.zeros(1, dtype=torch.int64))[0][0]
        _check_shape(masks, tuple(image.shape))

    @classmethod
    def from_targets(cls, targets: Targets, dataset, weight: float = RRR_WEIGHT,
                     dilate: int | None = None) -> RRRPenalty:
        """RRR on i2x's flagged regions: each target's flagged cells as pixels
        (``Targets.masks_for``, grown by ``dilate`` px, default half a cell) and no mask elsewhere."""
        if not isinstance(targets, Targets):
            raise TypeError(f"targets: expected i2x Targets, got {describe(targets)}")
        targets.check_dataset(dataset)
        rows = targets.selected.nonzero().flatten()
        return cls(targets.masks_for(rows, dilate), weight, indices=targets.indices[rows], dataset=dataset)

    def forward(self, inputs: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                indices: torch.Tensor) -> torch.Tensor:
        """The penalty on this batch. ``inputs`` is what the model was called on, with
        ``requires_grad=True``. ``indices`` are the batch's dataset positions. ``labels`` are unused:
        the paper penalises the gradient of every class's log-probability."""
        del labels
        indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
        if self.aligned and indices.numel() and int(indices.max()) >= self.row_of.numel():
            raise ValueError(f"indices: dataset position {int(indices.max())} has no mask: the masks cover "
                             f"{self.row_of.numel()} positions; build the penalty on the training dataset")
        rows, hit = rows_at(self.row_of, indices)
        if hit.numel() == 0 or self.weight == 0:
            return logits.new_zeros(())
        if not inputs.requires_grad:
            raise ValueError("inputs: the penalty needs the batch's input with requires_grad=True, set before the "
                             "forward pass (fit does this for a term with wants_input_gradient)")
        _check_shape(self.masks, tuple(inputs.shape[1:]))
        # d/dx of the log-probabilities summed over classes and batch: with no BatchNorm in training
        # mode, sample i's gradient is that of its own sum (the paper's per-sample term).
        total = F.log_softmax(logits.float(), dim=1).sum()
        grad = torch.autograd.grad(total, inputs, create_graph=True)[0]
        hit_d = hit.to(inputs.device)
        mask = self.masks[rows[hit]].to(inputs.device)
        on = (grad[hit_d].float() * mask).pow(2).flatten(1).sum(1)
        return self.weight * on.sum() / indices.numel()


def _check_shape(masks: torch.Tensor, image: tuple[int, ...]) -> None:
    """``masks [N, 1|C, H, W]`` against one image ``(C, H, W)``."""
    if len(image) != 3 or tuple(masks.shape[2:]) != image[1:] or masks.shape[1] not in (1, image[0]):
        raise ValueError(f"masks: expected [N, H, W], [N, 1, H, W] or [N, C, H, W] for images of shape "
                         f"{list(image)}, got {list(masks.shape)}")
