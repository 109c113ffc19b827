"""Probe images read from any map-style dataset, a batch at a time: never all held at once.

:class:`StreamedImages` stands where a probe's ``[N, C, H, W]`` tensor would: slicing it, or
indexing it with positions, gives another view (no image is read); :meth:`StreamedImages.batches`
reads them through a ``DataLoader`` over a ``Subset`` of the source dataset (``num_workers`` and
``pin_memory`` are the user's), and :func:`iter_batches` lets every consumer (the tracker's
records, the BatchNorm recalibration, prototype discovery) walk a tensor and a view alike.

A dataset item is an ``(image, label)`` pair or sequence (torchvision datasets, ``TensorDataset``,
``ImageFolder`` with a ``ToTensor`` transform, a user's own); the image must be a float tensor and
every image must have the same shape.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from i2x._internal.checks import describe
from i2x._internal.heap import GrowthTrimmer
from i2x.data import ImageDataset, batch_of

__all__ = ["StreamedImages", "iter_batches", "holds_tensors", "images_at", "batches_at"]

# After a batch at least this large has been used, the C heap's free pages go back to the OS
# (release_freed_heap: without it a long 224 px record grew ~3 MB per batch). Small batches (a
# 28 px probe: 256 images are 0.8 MB) skip the call: their frees did not fragment the heap, and the
# trim would only cost a walk over it. The bar is low because the pass's working memory, not the
# input, is what fragments: resnet50's budget-sized batch of 10 at 224 px (6 MB of input) grew
# 476 MiB over 1,800 images untrimmed and 237 MiB trimmed, in the same time (89 s vs 91 s).
TRIM_BATCH_BYTES = 2**20


def _first_image(item, where: str) -> torch.Tensor:
    image = item[0] if isinstance(item, (tuple, list)) and item else item
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{where}: expected an (image tensor, label) item, got {describe(item)}; give the dataset a "
                        "transform that makes tensors (e.g. torchvision.transforms.ToTensor())")
    return image


def _images_only(batch):
    """collate_fn: stack the items' images (the labels are the probe's, read once beforehand)."""
    images = [_first_image(item, "dataset item") for item in batch]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"dataset images of one batch have different shapes {sorted(shapes)}: resize them to one "
                         "size in the dataset's transform")
    return torch.stack(images)


class StreamedImages:
    """The images of ``dataset`` at ``indices``, read on demand through a DataLoader.

    Behaves like the ``[N, C, H, W]`` tensor it replaces where the probe uses one: ``len``,
    ``shape``, ``dtype``, ``dim()``, ``is_floating_point()``, ``view[a:b]`` and ``view[positions]``
    (both lazy), ``view[i]`` (one image) and :meth:`load` (a batch as a tensor).
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | torch.Tensor, *, num_workers: int = 0,
                 pin_memory: bool = False, batch_size: int = 256):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(f"dataset: expected a map-style torch Dataset (len + indexing), got {describe(dataset)}")
        self.dataset = dataset
        self.indices = torch.as_tensor(indices, dtype=torch.int64).flatten()
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.batch_size = int(batch_size)
        self._sample: torch.Tensor | None = None  # the first image, read once for shape and dtype

    def _like(self, indices: torch.Tensor) -> StreamedImages:
        view = StreamedImages(self.dataset, indices, num_workers=self.num_workers, pin_memory=self.pin_memory,
                              batch_size=self.batch_size)
        view._sample = self._sample
        return view

    # -- what the probe asks of its images ---------------------------------------------------

    def __len__(self) -> int:
        return int(self.indices.numel())

    def _first(self) -> torch.Tensor:
        if self._sample is None:
            if not len(self):
                raise ValueError("the probe has no images")
            self._sample = _first_image(self.dataset[int(self.indices[0])], f"dataset[{int(self.indices[0])}]")
        return self._sample

    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self), *self._first().shape])

    @property
    def dtype(self) -> torch.dtype:
        return self._first().dtype

    def dim(self) -> int:
        return 1 + self._first().dim()

    def is_floating_point(self) -> bool:
        return self._first().is_floating_point()

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._like(self.indices[index])
        if isinstance(index, int):
            return _first_image(self.dataset[int(self.indices[index])], f"dataset[{int(self.indices[index])}]")
        return self._like(self.indices[torch.as_tensor(index, dtype=torch.int64)])

    # -- reading ------------------------------------------------------------------------------

    def batches(self, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """The images in order, ``batch_size`` at a time (one DataLoader: workers stay up)."""
        loader = DataLoader(Subset(self.dataset, self.indices.tolist()), batch_size=batch_size or self.batch_size,
                            shuffle=False, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            collate_fn=_images_only)
        yield from loader

    def load(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Images ``start:stop`` as one tensor."""
        view = self[start:stop]
        return torch.cat(list(view.batches()), dim=0) if len(view) else torch.empty(0, *self._first().shape)

    def __repr__(self) -> str:
        return f"StreamedImages({type(self.dataset).__name__}, {len(self)} images)"


def _releasing(batches: Iterator[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
    """The batches, trimming the C heap after a large one has been used once the resident size
    has grown (see TRIM_BATCH_BYTES and GrowthTrimmer)."""
    trim = GrowthTrimmer()
    for start, batch in batches:
        large = batch.numel() * batch.element_size() >= TRIM_BATCH_BYTES
        yield start, batch
        del batch
        if large:
            trim()


def _streamed_batches(images: StreamedImages, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    start = 0
    for batch in images.batches(batch_size):
        yield start, batch
        start += batch.shape[0]


def iter_batches(images, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, batch)`` over a tensor's rows or a :class:`StreamedImages` view, in order."""
    if isinstance(images, StreamedImages):
        yield from _releasing(_streamed_batches(images, batch_size))
        return
    yield from _releasing((start, images[start:start + batch_size]) for start in range(0, images.shape[0], batch_size))


def holds_tensors(dataset) -> bool:
    """True for datasets that hand out a whole batch in one indexing operation from tensors they
    hold (an ``i2x.data.ImageDataset``, the ``i2x.loop.strategies`` wrappers with ``i2x_batch``): a
    DataLoader would only slow those down."""
    return hasattr(dataset, "i2x_batch") or isinstance(dataset, ImageDataset)


def images_at(dataset, indices, *, num_workers: int = 0, pin_memory: bool = False):
    """The images of ``dataset`` at ``indices``: a tensor for a dataset that holds its tensors, a
    :class:`StreamedImages` view (read a batch at a time through a DataLoader) for any other."""
    indices = torch.as_tensor(indices, dtype=torch.int64).flatten()
    if holds_tensors(dataset):
        return batch_of(dataset, indices)[0] if indices.numel() else torch.empty(0)
    return StreamedImages(dataset, indices, num_workers=num_workers, pin_memory=pin_memory)


def batches_at(dataset, indices, batch_size: int, *, num_workers: int = 0,
               pin_memory: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, images)`` of ``dataset`` at ``indices``, ``batch_size`` at a time: one indexing
    operation per batch for a dataset that holds its tensors, a DataLoader otherwise."""
    indices = torch.as_tensor(indices, dtype=torch.int64).flatten()
    if not holds_tensors(dataset):
        yield from iter_batches(StreamedImages(dataset, indices, num_workers=num_workers, pin_memory=pin_memory),
                                batch_size)
        return
    yield from _releasing((start, batch_of(dataset, indices[start:start + batch_size])[0])
                          for start in range(0, indices.numel(), batch_size))
