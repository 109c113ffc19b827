"""JTT, "just train twice" (Liu et al., ICML 2021): a literature baseline that needs no explanation
and no group labels. A first (identification) model's training-set errors stand in for the minority
groups, and training again draws those errors ``lambda_up`` times per epoch.

    errors = jtt_error_set(identification_model, train)
    i2x.finetune(model, train, sampler=jtt_sampler(train, errors, lambda_up=20, seed=seed))

The sampler is an :class:`~i2x.loop.strategies.OversampleSampler`, as the loop's ``reweighted`` arm
uses. Each epoch is the shared base order ``epoch_permutation(N, seed, epoch)`` with the error set's
extra draws slotted in, seeded. So JTT and the other arms of a seed see the samples they share in the
same order (common random numbers).
"""

from __future__ import annotations

import torch
from torch import nn

from i2x._internal.checks import check_int, describe
from i2x._internal.modules import checked_forward, eval_mode, run_device, unwrap_model
from i2x.data import batch_of, labels_of
from i2x.loop.strategies import OversampleSampler
from i2x.track.batchnorm import recalibrated_batchnorm

__all__ = ["JTT_LAMBDA_UP", "jtt_error_set", "jtt_sampler"]

#: The default upweighting. The paper tunes lambda_up on validation worst-group accuracy and lands
#: between 6 (text) and 100 (Waterbirds). 20 is the lower end of its image datasets; tune it.
JTT_LAMBDA_UP = 20


def jtt_error_set(model: nn.Module, dataset, *, batch_size: int = 512, device=None,
                  calibration: torch.Tensor | None = None) -> torch.Tensor:
    """``[E]`` int64 ascending positions of ``dataset`` that ``model`` misclassifies (argmax of its
    logits against the label). The model runs in eval mode, float32, without a graph, a batch at a
    time. Its BatchNorm statistics are recomputed on ``calibration`` images first and restored
    afterwards, as in ``i2x.evaluate``. Train/eval flags and weights are left as they were."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    batch_size = check_int(batch_size, "batch_size")
    module = unwrap_model(model)
    device = run_device(module, device)
    n = len(dataset)
    labels = labels_of(dataset)
    wrong = torch.zeros(n, dtype=torch.bool)
    with recalibrated_batchnorm(module, calibration, device), eval_mode(module), torch.no_grad():
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            x, _ = batch_of(dataset, idx)
            logits = checked_forward(module, x.to(device), "images").float()
            if logits.dim() != 2:
                raise ValueError(f"the model's output must be [batch, classes] logits, got shape {list(logits.shape)}")
            wrong[idx] = logits.argmax(1).cpu() != labels[idx]
    return wrong.nonzero().flatten()


def jtt_sampler(dataset, errors, lambda_up: int = JTT_LAMBDA_UP, seed: int = 0) -> OversampleSampler:
    """JTT's upsampled training set as a sampler over ``dataset``. Every position appears once per
    epoch, and each position in ``errors`` appears ``lambda_up`` times in all (``lambda_up - 1`` extra
    draws, slotted into the epoch's shared base order). Its length is
    ``len(dataset) + (lambda_up - 1) * len(errors)``.

    ``errors`` holds positions of ``dataset`` (:func:`jtt_error_set`), or is a bool tensor over it.
    An empty error set leaves nothing to upweight: the sampler is then the plain seeded order, the
    same as fine-tuning without JTT. ``lambda_up = 1`` does the same.
    """
    lambda_up = check_int(lambda_up, "lambda_up", 1)
    n = len(dataset)
    errors = torch.as_tensor(errors)
    if errors.dtype == torch.bool:
        if errors.shape != (n,):
            raise ValueError(f"errors: a bool mask must have one entry per sample ({n}), got {list(errors.shape)}")
        errors = errors.nonzero().flatten()
    if errors.dim() != 1 or (errors.numel() and errors.is_floating_point()):
        raise TypeError(f"errors: expected a 1-D tensor of dataset positions or a bool mask, got {describe(errors)}")
    errors = errors.long()
    if errors.numel() and (int(errors.min()) < 0 or int(errors.max()) >= n):
        raise ValueError(f"errors: positions must lie in [0, {n}), got {int(errors.min())}..{int(errors.max())}")
    if errors.unique().numel() != errors.numel():
        raise ValueError("errors: a position is listed twice; give each error once (lambda_up sets the weight)")
    # Without replacement, the extra draws run through the error set in whole rounds, so each error is
    # drawn exactly lambda_up - 1 extra times (the paper's upsampled copy of the dataset).
    return OversampleSampler(n, errors.sort().values, (lambda_up - 1) * errors.numel(), seed)
