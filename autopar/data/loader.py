"""``loader``: a ``torch.utils.data.DataLoader`` whose batches are this rank's share of each
global batch.

Why a thin wrapper with explicit keywords: the interesting part is the batch sampler; the loader
only wires it in (a ``batch_sampler`` excludes ``batch_size``/``shuffle``/``sampler``/``drop_last``
in ``DataLoader``, an easy thing to get wrong by hand). Every DataLoader option it forwards is
spelled out, so a misspelt keyword is a ``TypeError`` instead of being silently swallowed.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .sampler import GlobalBatchSampler


def loader(dataset: Dataset, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
           drop_last: bool = True, local_shuffle: float | None = None, partition: str = "contiguous",
           start_step: int = 0, shard: int | None = None, num_shards: int | None = None,
           collate_fn: Callable[[list[Any]], Any] | None = None, num_workers: int = 0, pin_memory: bool | None = None,
           prefetch_factor: int | None = None, persistent_workers: bool = False,
           worker_init_fn: Callable[[int], None] | None = None, timeout: float = 0) -> DataLoader:
    """A DataLoader over ``dataset`` yielding this rank's part of each global batch, ready for
    ``engine.step`` (no ``shard_batch`` needed). The sampler is ``loader(...).batch_sampler``:
    use its ``state_dict``/``load_state_dict``, ``step``, ``epoch`` and ``moved_samples``.

    The sampler options are those of ``GlobalBatchSampler``; the rest go to ``DataLoader``.
    ``pin_memory`` defaults to whether batches go to a CUDA device: the engine copies them with
    ``non_blocking=True``, which only overlaps anything from pinned memory.
    """
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"autopar.data.loader needs a map-style dataset with __len__ and __getitem__, "
                        f"got {type(dataset).__name__}; an iterable dataset cannot be sharded by index")
    sampler = GlobalBatchSampler(dataset, global_batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                                 local_shuffle=local_shuffle, partition=partition, start_step=start_step,
                                 shard=shard, num_shards=num_shards)
    if pin_memory is None:
        pin_memory = _batches_go_to_cuda()
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                      pin_memory=pin_memory, prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                      worker_init_fn=worker_init_fn, timeout=timeout)


def _batches_go_to_cuda() -> bool:
    from ..runtime.state import current_grid, is_initialized

    if is_initialized():
        return current_grid().device.type == "cuda"
    return torch.cuda.is_available()
