"""This rank's place and the few object collectives a checkpoint needs.

Checkpoints only move small metadata between ranks (tensor data goes through files), so Python
object collectives over all ranks are enough. A plain process with no ``autopar.init`` is a world
of one.

The collectives run on a gloo group of their own (``checkpoint_group``), for two reasons. Its
timeout is long (``AUTOPAR_CHECKPOINT_TIMEOUT``, 30 min by default): one rank writing a large
shard to a slow file system must not make the others' wait fail at the grid's collective timeout
(180 s), which NCCL's watchdog would enforce by killing the job. And an asynchronous save runs
its collectives from a background thread, where they must never interleave with the training
step's collectives on the grid's groups. Every checkpoint entry point first waits for a pending
asynchronous save, so the group is never used by two threads at once.
"""
from __future__ import annotations

import os
import weakref
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ..runtime import state
from ..runtime.grid import Grid
from ..runtime.state import current_grid, is_initialized
from .storage import CheckpointError

CHECKPOINT_TIMEOUT_S = 1800.0
# Weak both ways: after ``destroy`` neither the old grid (and through it every axis group) nor
# the checkpoint group may stay alive, or their gloo threads keep running in a long process.
_group: tuple[weakref.ref[Grid], weakref.ref[dist.ProcessGroup]] | None = None


def checkpoint_timeout() -> timedelta:
    seconds = float(os.environ.get("AUTOPAR_CHECKPOINT_TIMEOUT", CHECKPOINT_TIMEOUT_S))
    if seconds <= 0:
        raise ValueError(f"AUTOPAR_CHECKPOINT_TIMEOUT must be positive seconds, got {seconds}")
    return timedelta(seconds=seconds)


def checkpoint_group() -> dist.ProcessGroup | None:
    """The long-timeout gloo group over all ranks of the current grid, made on first use
    (collectively: every checkpoint entry point is called on every rank) and torn down by
    ``autopar.destroy`` with the grid's other groups."""
    global _group
    if not is_initialized() or current_grid().world_size == 1:
        return None
    grid = current_grid()
    group = _group[1]() if _group is not None and _group[0]() is grid else None
    if group is None:
        group = state.new_group(backend="gloo", timeout=checkpoint_timeout())
        _group = (weakref.ref(grid), weakref.ref(group))
    return group


class Ranks:
    def __init__(self) -> None:
        self.group = checkpoint_group()
        if is_initialized():
            grid = current_grid()
            self.rank, self.world, self.sizes, self.coords = grid.rank, grid.world_size, dict(grid.sizes), grid.coords
        else:
            self.rank, self.world = 0, 1
            self.sizes = dict(pp=1, dp=1, z=1, y=1, x=1)
            self.coords = dict.fromkeys(self.sizes, 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed, naming the failing ranks' errors: a problem
        only one rank can see must not leave the others waiting in the next collective."""
        mine = None if error is None else f"{type(error).__name__}: {error}"
        errors = [mine] * self.world
        if self.world > 1:
            dist.all_gather_object(errors, mine, group=self.group)
        failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
        if failed:
            raise CheckpointError("; ".join(failed)) from error
