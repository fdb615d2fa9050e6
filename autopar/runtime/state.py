"""``autopar.init`` / ``autopar.destroy``: the one piece of process-wide state, the current grid.

If ``torch.distributed`` is already initialised (by the user or a test harness) autopar uses that
world and leaves it alone on ``destroy``; otherwise it owns the default group and tears it down.
"""
from __future__ import annotations

import logging
import os
import random
from datetime import timedelta

import torch
import torch.distributed as dist

from .grid import Grid, build_groups, resolve_sizes
from .launcher import detect_launch, resolve_rendezvous

log = logging.getLogger("autopar")
if not log.handlers:
    # HPC users read job logs, not logging configs: show autopar's INFO lines (the launcher, the
    # grid, layers left replicated) unless the application configured the "autopar" logger itself.
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[autopar] %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

DEFAULT_TIMEOUT_S = 180.0
"""Short enough that a dead rank ends the job within minutes; long enough for a slow first step.
Override with ``init(timeout=...)`` or ``AUTOPAR_TIMEOUT`` (seconds)."""

_grid: Grid | None = None
_owns_world = False


def current_grid() -> Grid:
    if _grid is None:
        raise RuntimeError("autopar is not initialised: call autopar.init(...) first")
    return _grid


def is_initialized() -> bool:
    return _grid is not None


def seed_everything(seed: int) -> None:
    """The same seed on every rank, so replicated parameters start identical."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass


def _timeout(timeout: float | timedelta | None) -> timedelta:
    if isinstance(timeout, timedelta):
        return timeout
    if timeout is None:
        timeout = float(os.environ.get("AUTOPAR_TIMEOUT", DEFAULT_TIMEOUT_S))
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    return timedelta(seconds=timeout)


def init(pp: int = 1, dp: int | None = None, x: int = 1, y: int = 1, z: int = 1, *,
         backend: str | None = None, device: str | torch.device | None = None,
         timeout: float | timedelta | None = None, seed: int = 0) -> Grid:
    """Start (or join) the distributed world and lay the grid over it.

    ``dp`` is inferred as world / (pp*x*y*z) when left out. ``backend`` defaults to NCCL where
    CUDA is available and gloo otherwise; ``device`` to ``cuda:LOCAL_RANK`` or ``cpu``.
    ``timeout`` (seconds) bounds every collective, so a dead rank ends the job instead of hanging it.
    """
    global _grid, _owns_world
    if _grid is not None:
        raise RuntimeError("autopar.init() was already called in this process; "
                           "call autopar.destroy() before initialising again")
    td = _timeout(timeout)
    if dist.is_initialized():
        launcher, rank, world, local_rank = "existing", dist.get_rank(), dist.get_world_size(), \
            int(os.environ.get("LOCAL_RANK", "0"))
        sizes = resolve_sizes(world, pp, dp, x, y, z)
        backend = dist.get_backend()
    else:
        launch = detect_launch()
        # Check the grid before any rendezvous: a bad grid must fail on every rank, not hang.
        sizes = resolve_sizes(launch.world_size, pp, dp, x, y, z)
        launch = resolve_rendezvous(launch)
        launcher, rank, world, local_rank = launch.launcher, launch.rank, launch.world_size, \
            launch.local_rank
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=rank, world_size=world, timeout=td)
        _owns_world = True
    if device is None:
        device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}") \
            if backend == "nccl" else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = build_groups(sizes, rank, td, reuse_world=_owns_world)
    _grid = Grid(sizes=sizes, rank=rank, local_rank=local_rank, launcher=launcher,
                 backend=backend, device=device, _groups=groups)
    seed_everything(seed)
    if rank == 0:
        log.info("launcher=%s world=%d %s", launcher, world, _grid)
    return _grid


def destroy() -> None:
    """Tear down the grid's groups (and the world, if ``init`` created it). Safe to call twice."""
    global _grid, _owns_world
    if _grid is None:
        return
    if dist.is_initialized():
        for group in {id(g): g for g in _grid._groups.values()}.values():
            if group is not dist.group.WORLD and group != dist.GroupMember.NON_GROUP_MEMBER:
                dist.destroy_process_group(group)
        if _owns_world:
            dist.destroy_process_group()
    _grid, _owns_world = None, False
