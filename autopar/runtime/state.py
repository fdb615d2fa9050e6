"""``autopar.init`` / ``autopar.destroy``: the one piece of process-wide state, the current grid.

If ``torch.distributed`` is already initialised (by the user or a test harness) autopar uses that
world and leaves it alone on ``destroy``; otherwise it owns the default group and tears it down.
"""
from __future__ import annotations

import gc
import logging
import os
import random
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from . import diagnostics
from .grid import Grid, build_groups
from .gridspec import GRID_ENV, parse_grid, resolve_sizes
from .launcher import connect_store, detect_launch, resolve_rendezvous

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
_timeout_td: timedelta | None = None
_extra_groups: list[dist.ProcessGroup] = []  # made after init (e.g. tied stages); destroyed with the grid


def _requested_grid(explicit: dict[str, int | None]) -> dict[str, int | None]:
    """The grid arguments for ``init``: the explicit ones if the caller gave any (the script owns
    its grid then), else ``AUTOPAR_GRID``; unset axes are 1 and ``dp`` is inferred."""
    given = {a: n for a, n in explicit.items() if n is not None}
    env = os.environ.get(GRID_ENV, "")
    env = "" if env.strip() == "auto" else env  # explicit sizes win over "auto" (see _auto_request)
    try:
        from_env = parse_grid(env)
    except ValueError as e:
        raise ValueError(f"{GRID_ENV}: {e}") from None
    if given and from_env and from_env != given:
        log.warning("init(%s) overrides %s=%s", ", ".join(f"{a}={n}" for a, n in given.items()), GRID_ENV, env)
    chosen = given or from_env
    return {"pp": 1, "x": 1, "y": 1, "z": 1, "dp": None, **chosen}


def _auto_request(grid: str | None, explicit: dict[str, int | None],
                  planner: dict[str, Any]) -> dict[str, Any] | None:
    """The planner's arguments when the grid is ``"auto"`` (from ``init`` or ``AUTOPAR_GRID``),
    else None. Explicit sizes next to ``grid="auto"`` contradict it and raise."""
    if grid is not None and grid != "auto":
        raise ValueError(f"init(grid={grid!r}): the only grid name is 'auto'; give sizes as pp=, dp=, x=, y=, z=")
    given = [a for a, n in explicit.items() if n is not None]
    if grid is None and (given or os.environ.get(GRID_ENV, "").strip() != "auto"):
        return None
    if given:
        raise ValueError(f"init(grid='auto') picks every size itself; drop {', '.join(given)}")
    missing = [k for k in ("model", "hardware", "global_batch") if planner[k] is None]
    if missing:
        raise ValueError(f"grid='auto' needs {', '.join(f'{k}=' for k in missing)} in autopar.init(...): "
                         "the planner ranks grids for a model, a machine and a global batch")
    return planner


def _sizes(world: int, requested: dict[str, int | None],
           planner: dict[str, Any] | None) -> tuple[dict[str, int], str]:
    """The grid's sizes for ``world`` ranks, and what the planner chose (empty without "auto"):
    the planner lives with ``autopar plan``, imported only when asked for."""
    if planner is None:
        return resolve_sizes(world, **requested), ""
    from ..cli.cost import choose_grid

    best = choose_grid(world, **planner)
    return best.sizes, (f"grid='auto' chose {best.sizes} with {best.microbatches} microbatch(es), "
                        f"predicted {best.step:.3g} s per step on {planner['hardware']}")


def current_grid() -> Grid:
    if _grid is None:
        raise RuntimeError("autopar is not initialised: call autopar.init(...) first")
    return _grid


def new_group(ranks: list[int] | None = None, backend: str | None = None,
              timeout: timedelta | None = None) -> dist.ProcessGroup:
    """A process group beyond the grid's axis groups (say, the stages that share a tied weight),
    with the grid's collective timeout unless given, torn down by ``destroy``. Collective over
    the world. Hold it weakly where it outlives a grid: the list ``destroy`` empties is what keeps
    it, and a destroyed gloo group's threads run until its last reference goes."""
    group = dist.new_group(ranks, timeout=timeout or _timeout_td, backend=backend)
    if group != dist.GroupMember.NON_GROUP_MEMBER:
        _extra_groups.append(group)
    return group


def _forget_compiled_graphs() -> None:
    """Drop what ``torch.compile`` built around the destroyed groups. Dynamo stores each compiled
    piece of a function as a ``__compiled_fn_*`` / ``__resume_at_*`` global of the module of the
    outermost frame it compiled (a whole model compiles as one graph, so that is the model's own
    module, or a wrapper's such as ``transformers.utils.deprecation``: every loaded module is
    searched), and ``torch._dynamo.reset()`` empties its caches but not those globals; the graphs
    keep their process groups, and FakeTensorMode's process-wide dispatch cache keys on the ops'
    arguments, groups included. Either way a destroyed gloo group (three threads, one polling every
    10 ms) stayed alive for the life of the process. Compiled code is only valid for the grid it
    was traced on, so a later ``init`` recompiles anyway."""
    dynamo = sys.modules.get("torch._dynamo")
    # Dynamo numbers every frame it compiles and reset() restarts the count: at 0 nothing was
    # compiled since the last reset, and the search (35 ms over ~2,400 modules) is skipped.
    frames = getattr(sys.modules.get("torch._dynamo.convert_frame"), "FRAME_COUNTER", 1)
    if dynamo is not None and frames:
        dynamo.reset()
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for key in [k for k in namespace if k.startswith(("__compiled_fn_", "__resume_at_"))]:
                # Not ``del``: Dynamo's own clean-up hook deletes the name when the code dies.
                namespace[key] = None
    fake = sys.modules.get("torch._subclasses.fake_tensor")
    cache = getattr(getattr(fake, "FakeTensorMode", None), "cache", None)
    if isinstance(cache, dict):
        cache.clear()


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


def choose_device(backend: str, local_rank: int, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given; else ``cuda:LOCAL_RANK`` (modulo the visible devices) whenever the
    world can move CUDA tensors: a backend naming NCCL (``"nccl"``, ``"cuda:nccl,cpu:gloo"``), or
    one left to torch (``"undefined"``, torch's per-device defaults) on a machine with CUDA.
    A user who called ``init_process_group()`` themselves must not silently train on the CPU."""
    if device is not None:
        return torch.device(device)
    cuda = "nccl" in backend or (backend == "undefined" and torch.cuda.is_available())
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    if "nccl" in backend:
        raise RuntimeError(f"the process group's backend is {backend!r} but this process sees no CUDA device; "
                           "check CUDA_VISIBLE_DEVICES, or pass backend='gloo'")
    return torch.device("cpu")


def _timeout(timeout: float | timedelta | None) -> timedelta:
    if isinstance(timeout, timedelta):
        return timeout
    if timeout is None:
        timeout = float(os.environ.get("AUTOPAR_TIMEOUT", DEFAULT_TIMEOUT_S))
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    return timedelta(seconds=timeout)


def init(pp: int | None = None, dp: int | None = None, x: int | None = None, y: int | None = None,
         z: int | None = None, *,
         backend: str | None = None, device: str | torch.device | None = None,
         timeout: float | timedelta | None = None, seed: int = 0, grid: str | None = None,
         model: Any = None, hardware: Any = None, global_batch: int | None = None,
         seq_len: int | None = None, schedule: str = "1f1b") -> Grid:
    """Start (or join) the distributed world and lay the grid over it.

    ``dp`` is inferred as world / (pp*x*y*z) when left out. ``backend`` defaults to NCCL where
    CUDA is available and gloo otherwise; ``device`` to ``cuda:LOCAL_RANK`` or ``cpu``.
    ``timeout`` (seconds) bounds every collective, so a dead rank ends the job instead of hanging it.
    Grid axes left out are 1. When no grid argument is given at all, the sizes come from the
    ``AUTOPAR_GRID`` environment variable (``"pp=2,x=2"``, set by ``autopar run --grid``) if set;
    explicit arguments always win over it.

    ``grid="auto"`` (or ``AUTOPAR_GRID=auto``) lets the planner pick the sizes: the best
    feasible grid for ``model`` (a module, ideally built on meta, a transformers config, or a
    family name of ``autopar plan``) on ``hardware`` (a preset such as ``"h100"`` or a JSON
    file) for ``global_batch`` sequences of ``seq_len`` tokens under ``schedule``. It is
    computed from shapes and fixed figures only, so every rank makes the same choice without
    communicating; ``autopar plan --hardware`` prints the same ranking.
    """
    global _grid, _owns_world, _timeout_td
    if _grid is not None:
        raise RuntimeError("autopar.init() was already called in this process; "
                           "call autopar.destroy() before initialising again")
    td = _timeout_td = _timeout(timeout)
    explicit = dict(pp=pp, dp=dp, x=x, y=y, z=z)
    auto = _auto_request(grid, explicit, dict(model=model, hardware=hardware, global_batch=global_batch,
                                              seq_len=seq_len, schedule=schedule))
    requested = _requested_grid(explicit) if auto is None else {}
    debug = diagnostics.debug_enabled()
    if debug:  # torch's cross-rank check wraps only groups made after the level is set
        diagnostics.enable_debug()
    if dist.is_initialized():
        launcher, rank, world, local_rank = "existing", dist.get_rank(), dist.get_world_size(), \
            int(os.environ.get("LOCAL_RANK", "0"))
        sizes, chose = _sizes(world, requested, auto)
        backend = dist.get_backend()
        device = choose_device(backend, local_rank, device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        launch = detect_launch()
        # Check the grid before any rendezvous: a bad grid must fail on every rank, not hang.
        sizes, chose = _sizes(launch.world_size, requested, auto)
        launch = resolve_rendezvous(launch)
        launcher, rank, world, local_rank = launch.launcher, launch.rank, launch.world_size, \
            launch.local_rank
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        device = choose_device(backend, local_rank, device)
        if device.type == "cuda":
            # Before the world exists: NCCL then binds its communicator to this device, and
            # device_id lets every sub-group be split from it (ncclCommSplit) instead of each
            # of up to 31 groups bootstrapping its own lazily.
            torch.cuda.set_device(device)
        # Our own store, not init_method="tcp://": its connect is bounded by the timeout on
        # every rank even when the port is held by someone else (see connect_store).
        store = connect_store(launch.master_addr, launch.master_port, rank, world, td)
        # In debug mode no device_id: a device-bound world makes groups with split_group, which
        # torch's ProcessGroupWrapper (the cross-rank check) does not wrap.
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=td,
                                device_id=device if "nccl" in backend and not debug else None)
        _owns_world = True
    diagnostics.install(rank, td.total_seconds(), debug)
    try:
        groups = build_groups(sizes, rank, td, reuse_world=_owns_world)
    except BaseException:
        diagnostics.uninstall()
        raise
    _grid = Grid(sizes=sizes, rank=rank, local_rank=local_rank, launcher=launcher,
                 backend=backend, device=device, _groups=groups)
    seed_everything(seed)
    if rank == 0:
        log.info("launcher=%s world=%d %s", launcher, world, _grid)
        if chose:
            log.info("%s", chose)
    return _grid


def destroy() -> None:
    """Tear down the grid's groups (and the world, if ``init`` created it). Safe to call twice."""
    global _grid, _owns_world
    if _grid is None:
        diagnostics.uninstall()  # an init that failed after enabling debug mode
        return
    diagnostics.uninstall()
    if dist.is_initialized():
        groups = [*_grid._groups.values(), *_extra_groups]
        for group in {id(g): g for g in groups}.values():
            if group is not dist.group.WORLD and group != dist.GroupMember.NON_GROUP_MEMBER:
                dist.destroy_process_group(group)
        if _owns_world:
            dist.destroy_process_group()
    _grid, _owns_world = None, False
    _extra_groups.clear()
    _forget_compiled_graphs()
    # A destroyed gloo group keeps its transport threads until the last reference dies, and
    # parallelised models reach their groups through reference cycles (modules <-> hooks):
    # collect now, or a process that re-initialises many times piles up spinning threads.
    gc.collect()
