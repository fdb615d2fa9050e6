"""This rank's place and the few object collectives a checkpoint needs.

Checkpoints only move small metadata between ranks (tensor data goes through files), so Python
object collectives over all ranks are enough. A plain process with no ``autopar.init`` is a world
of one. An asynchronous save runs its collectives from a background thread, on a gloo group of
its own, so they can never interleave with the training step's collectives.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ..runtime.state import current_grid, is_initialized
from .storage import CheckpointError


class Ranks:
    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
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
