"""A local gloo world for the bench scripts: ``spawn_gloo(worker, world, *args)`` starts ``world``
processes on a free port, each with torch on one thread and the default group formed, calls
``worker(rank, *args)`` in each and tears the group down. One place for what every multi-rank
benchmark needs before its own work begins."""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, port: int, worker: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(worker: Callable[..., None], world: int, *args: Any) -> None:
    """Run ``worker(rank, *args)`` on ``world`` local gloo ranks (``worker`` must be picklable:
    a module-level function of the script)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(world, port, worker, args), nprocs=world)
