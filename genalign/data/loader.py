"""Stream the trainer's micro-batches through a ``torch.utils.data.DataLoader`` without materialising the dataset.

The dataset is map-style (``__len__`` and ``__getitem__``; a list of row dicts is one). The loader's batch sampler
yields, for micro-steps ``start, start + 1, …``, this process's share (:class:`genalign.distributed.Shard`) of the
global micro-batch :class:`genalign.data.batching.RowOrder` gives for that step, so the rows a step trains on are a
pure function of ``(seed, step, process index, process count)``: resuming at step k rebuilds the loader at k, and the
number of DataLoader workers changes only who reads a row, never which row is read. Each item arrives as
``(index, row)``; the collate keeps the list as it is (steps collate rows through their adapter).

Iterable datasets are refused: their position cannot be restored without replaying them, and how their items are
split over processes and workers would decide which rows each step sees, so neither exact resume nor the
one-process equality of :mod:`genalign.distributed` could hold.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from genalign.data.batching import RowOrder
from genalign.distributed import Shard

#: field a dataset may add to a row that stands in for bad rows it skipped: the sources of those rows
SKIPPED_ROWS = "skipped_rows"


def check_map_style(dataset: Any) -> None:
    """Raise unless ``dataset`` supports ``len()`` and indexing (a list, a ``torch.utils.data.Dataset`` with both)."""
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(
            f"the trainer needs a map-style dataset (__len__ and __getitem__), got {type(dataset).__name__}: exact "
            "resume and multi-process runs pick rows by index as a function of the step. Wrap the data in a "
            "torch.utils.data.Dataset whose __getitem__ reads one row (e.g. genalign.data.pickapic.PickAPicDataset "
            "reads parquet row groups lazily), or pass a list"
        )


class MicroBatches:
    """Batch sampler: this process's dataset indices of micro-steps ``start … stop − 1``."""

    def __init__(self, order: RowOrder, shard: Shard, start: int, stop: int):
        self.order, self.shard, self.start, self.stop = order, shard, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for micro_step in range(self.start, self.stop):
            yield self.shard.rows(self.order.indices(micro_step))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


class Chunks:
    """Batch sampler: the given contiguous index ranges, in order (reference caching reads the set in chunks)."""

    def __init__(self, ranges: Sequence[range]):
        self.ranges = list(ranges)

    def __iter__(self) -> Iterator[list[int]]:
        return (list(r) for r in self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)


class _Indexed(Dataset):
    """``(i, dataset[i])``: the rows keep their dataset index through the workers."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i]


def keep_rows(items: list[tuple[int, Any]]) -> tuple[list[int], list[Any]]:
    """Collate: the micro-batch's indices and its row dicts, unchanged."""
    return [i for i, _ in items], [row for _, row in items]


def row_loader(dataset: Any, batch_sampler: Any, *, num_workers: int = 0, prefetch_factor: int | None = 2,
               pin_memory: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader yielding ``(indices, rows)`` per batch of ``batch_sampler``.

    ``seed`` seeds the loader's own generator: creating an iterator draws the workers' base seed from it, which
    would otherwise advance the global torch RNG (dropout) and make a run depend on when its loaders were built.
    ``pin_memory`` pins the rows' tensors (useful with CUDA only; the trainer passes it on CUDA only).
    """
    check_map_style(dataset)
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0 (0 reads rows in the training process)")
    return DataLoader(
        _Indexed(dataset), batch_sampler=batch_sampler, collate_fn=keep_rows, num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )
