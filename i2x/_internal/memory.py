"""Default batch sizes chosen from a memory budget instead of a fixed count.

A fixed default (256 images) fits a 28 px probe in a few MiB and a 224 px one in 1.9 GiB. So every
pass whose batch the user did not set (the tracker's records, prototype discovery, the target
rule, explain-files, an experiment's evaluations) asks :func:`auto_batch_size`: it runs the pass
once on one image and once on two, counts the bytes of the tensors alive at the peak of each
(:func:`peak_tensor_bytes`), and fits as many images as the budget holds, capped at 256 so that
small images batch exactly as before.

The count is of tensors, not of the process: the allocator's own scratch (oneDNN's convolution
workspace, about 50 MiB for resnet50 at 224 px on the CPU) is not a tensor. A share of the budget
(:data:`SCRATCH_SHARE`) is kept for it; ``tests/test_memory_budget.py`` measures the resident
memory a record really takes against the budget.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from i2x._internal.checks import check_number

__all__ = ["DEFAULT_MEMORY_BUDGET_MIB", "MAX_AUTO_BATCH", "SCRATCH_SHARE", "SCRATCH_FLOOR_MIB", "check_memory_budget",
           "peak_tensor_bytes", "auto_batch_size"]

DEFAULT_MEMORY_BUDGET_MIB = 256.0
# The largest batch a default picks: the fixed default of the versions before the budget, so a
# small-image pass (Fashion-MNIST) is batched as it always was.
MAX_AUTO_BATCH = 256
# Memory a pass holds that is not a tensor (oneDNN's convolution scratch, the allocator's slack),
# measured on the 2-core Xeon after a warm-up at the same batch (benchmarks/RESULTS.md, "Default
# batches from a memory budget"): about as much as the model's weights once (resnet50: ~100 MiB
# for 90 MiB of weights), plus a part of each image's tensors. The budget keeps the weights' size,
# SCRATCH_FLOOR_MIB, and SCRATCH_SHARE of every image's tensors for it.
SCRATCH_SHARE = 0.25
SCRATCH_FLOOR_MIB = 16.0
# When the pass cannot be measured (a model the dispatch mode cannot run), the per-image cost is
# taken as this many copies of the input: above the measured 11x (resnet18) and 17x (resnet50).
FALLBACK_INPUT_COPIES = 32
_MIB = 2**20


def check_memory_budget(budget_mib, name: str = "memory_budget") -> float:
    """The budget in MiB as a float, or the default for None; a positive finite number otherwise."""
    if budget_mib is None:
        return DEFAULT_MEMORY_BUDGET_MIB
    return check_number(budget_mib, name, 0, low_open=True)


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the storages the ops inside it create, while they live, and the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.live:  # an in-place op or a view hands back a storage already counted
                self.live[key] = storage.nbytes()
                self.current += self.live[key]
                self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._release, key)
        return out


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """The most bytes of tensors created inside ``fn()`` that were alive at one time."""
    with _LiveTensorBytes() as counter:
        fn()
    return counter.peak


def auto_batch_size(step: Callable[[torch.Tensor], object], sample: torch.Tensor, budget_mib: float | None = None,
                    *, in_flight: int = 1, reserve_bytes: int = 0, maximum: int = MAX_AUTO_BATCH) -> int:
    """The largest batch (1 to ``maximum``) whose pass ``step(batch)`` fits ``budget_mib``.

    ``sample``: one image ``[C, H, W]`` (or a batch whose first image is used), on the device the
    pass runs on. ``in_flight``: input batches alive at once besides the one in the pass (a
    DataLoader's prefetched batches). ``reserve_bytes``: kept out of the budget (the size of the
    model's weights). ``step`` runs three times on one or two images.
    """
    budget = (check_memory_budget(budget_mib) - SCRATCH_FLOOR_MIB) * _MIB - reserve_bytes
    image = sample if sample.dim() == 3 else sample[0]
    input_bytes = image.numel() * image.element_size()
    one, two = image.unsqueeze(0), torch.stack([image, image])
    # Warm-up outside the count (lazy initialisation, weight reorders are not per image); an error
    # here is the pass's own (a model that does not match its run, say) and is raised as it is.
    step(one)
    try:
        single, double = peak_tensor_bytes(lambda: step(one)), peak_tensor_bytes(lambda: step(two))
    except Exception as e:  # noqa: BLE001 - a pass the counting dispatch mode cannot run still gets a batch
        warnings.warn(f"i2x: could not measure the memory of one batch ({type(e).__name__}: {e}); sizing batches "
                      f"as {FALLBACK_INPUT_COPIES} copies of the input per image", RuntimeWarning, stacklevel=2)
        single, double = 0, FALLBACK_INPUT_COPIES * input_bytes
    per_image = max(double - single, 1) * (1 + SCRATCH_SHARE) + input_bytes * (1 + in_flight)
    fixed = max(single - (double - single), 0)
    fits = math.floor((budget - fixed) / per_image)
    return int(min(max(fits, 1), maximum))
