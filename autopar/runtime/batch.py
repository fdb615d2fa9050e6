"""Slicing batches along dim 0: this rank's share of a global batch, and microbatches.

A batch is a tensor, or a dict / tuple / list of them (nested is fine); non-tensor leaves such
as flags are passed through untouched.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .state import current_grid


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return type(batch)((k, map_tensors(v, fn)) for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    sizes: set[int] = set()
    map_tensors(batch, lambda t: sizes.add(t.shape[0]))
    if len(sizes) != 1:
        raise ValueError(f"batch tensors must share one size along dim 0, found {sorted(sizes) or 'no tensors'}")
    return sizes.pop()


def split_batch(batch: Any, parts: int, what: str = "parts") -> list[Any]:
    """Split along dim 0 into ``parts`` equal slices (views, no copies)."""
    n = batch_size(batch)
    if n % parts:
        raise ValueError(f"batch of {n} samples does not divide into {parts} {what}; "
                         f"use a batch size that is a multiple of {parts}")
    step = n // parts
    return [map_tensors(batch, lambda t, i=i: t[i * step:(i + 1) * step]) for i in range(parts)]


def shard_batch(global_batch: Any) -> Any:
    """This rank's share of ``global_batch``.

    The batch is cut into dp*z equal slices; ranks that differ only in pp, x or y (the stages of
    one pipeline, the tensor-parallel shards of one layer) get the same slice.
    """
    grid = current_grid()
    return split_batch(global_batch, grid.batch_shards,
                       f"data shards (dp*z = {grid.sizes['dp']}*{grid.sizes['z']})")[grid.batch_shard_index]
