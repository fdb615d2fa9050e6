"""Slicing batches along dim 0: this rank's share of a global batch, and microbatches; and the
check that the ranks sharing one share were really handed the same batch (``BatchCheck``).

A batch is a tensor, or a dict / tuple / list of them (nested is fine); non-tensor leaves such
as flags are passed through untouched.
"""
from __future__ import annotations

import os
import zlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from .grid import Grid
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


CHECK_ENV = "AUTOPAR_CHECK_BATCH"
"""``every``: check every call; ``off``: never; unset: calls 1, 2, 4, 8, ... (about 20 in a run)."""


def _leaves(batch: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(batch, dict):
        for k in sorted(batch, key=str):  # peers may build their dicts in another order
            yield from _leaves(batch[k], f"{path}.{k}")
    elif isinstance(batch, (tuple, list)):
        for i, v in enumerate(batch):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, batch


def fingerprint(batch: Any, device: torch.device) -> torch.Tensor:
    """(structure, values) as two exact float64 numbers: a CRC of every leaf's path, shape and
    dtype (of plain non-tensor leaves' values, of other objects' types), and a position-weighted
    sum of every tensor's elements. Equal batches give bit-equal fingerprints on like devices
    (same ops, same order)."""
    structure, total = [], torch.zeros((), dtype=torch.float64, device=device)
    for i, (path, leaf) in enumerate(_leaves(batch)):
        if isinstance(leaf, torch.Tensor):
            structure.append((path, tuple(leaf.shape), str(leaf.dtype)))
            flat = torch.view_as_real(leaf) if leaf.is_complex() else leaf
            flat = torch.nan_to_num(flat.detach().reshape(-1).to(device, torch.float64))
            weights = torch.arange(flat.numel(), device=device, dtype=torch.float64).remainder_(251).add_(1 + i)
            total += (flat * weights).sum()
        elif leaf is None or isinstance(leaf, (bool, int, float, str, bytes)):
            structure.append((path, repr(leaf)))
        else:  # other objects' reprs may hold a memory address, different on every rank
            structure.append((path, type(leaf).__qualname__))
    crc = float(zlib.crc32(repr(structure).encode()))
    return torch.stack([torch.tensor(crc, dtype=torch.float64, device=device), total])


class BatchCheck:
    """Ranks that hold one data shard (the stages of one pipeline, the x, y shards of its layers)
    must be handed the same batch. A rank that loads its own data (a sampler over the world
    rather than over dp*z shards) trains silently wrong when the shapes happen to match, and
    hangs NCCL when they do not. So on a few calls, the same on every rank (the 1st, 2nd, 4th,
    8th...; ``AUTOPAR_CHECK_BATCH=every`` for all), the peers compare fingerprints and every one
    of them raises, naming the ranks that differ. Each check is one tiny all-gather and one host
    sync at the start of a step."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.axes = grid.batch_peer_axes
        self.calls = 0
        mode = os.environ.get(CHECK_ENV, "")
        if mode not in ("", "every", "off"):
            raise ValueError(f"{CHECK_ENV}={mode!r}: use 'every', 'off', or leave it unset")
        self.mode = mode

    def due(self) -> bool:
        self.calls += 1
        if self.mode == "off" or self.grid.size(*self.axes) == 1:
            return False
        return self.mode == "every" or self.calls & (self.calls - 1) == 0

    def __call__(self, batch: Any) -> None:
        if not self.due():
            return
        grid, ranks = self.grid, self.grid.ranks(*self.axes)
        mine = fingerprint(batch, grid.device)
        prints = [torch.empty_like(mine) for _ in ranks]
        dist.all_gather(prints, mine, group=grid.group(*self.axes))
        table = torch.stack(prints).cpu()
        differ = [r for r, row in zip(ranks, table) if not torch.equal(row, table[0])]
        if differ:
            what = "shapes, dtypes or keys" if any(row[0] != table[0, 0] for row in table) else "values"
            raise ValueError(
                f"ranks {list(ranks)} hold one data shard ({', '.join(a for a in self.axes if grid.sizes[a] > 1)} "
                "peers) and must get the same "
                f"batch, but {differ} got other {what} than rank {ranks[0]} (call {self.calls}); pass "
                "autopar.shard_batch(global_batch) on every rank, or load with autopar.data's "
                f"GlobalBatchSampler, which shards over dp*z = {grid.batch_shards}, not over the world")
