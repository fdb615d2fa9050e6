"""Find out who launched us, so ``autopar.init()`` needs no launcher argument.

Every launcher publishes rank and world size under its own environment names. We read them
into one :class:`Launch` record. The rendezvous address is the only part that differs in kind:
torchrun exports it, Slurm lets us derive it from the node list and job id, and under MPI rank 0
broadcasts its own address over MPI itself (mpi4py), because nothing else is shared yet.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch.distributed as dist

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process. ``master_addr``/``master_port`` may be None when
    they have to be agreed on at run time (MPI without ``MASTER_ADDR``)."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm host list such as ``gpu[01-03,7],login1`` into host names.

    Commas split hosts only outside brackets; a bracket holds comma-separated numbers and
    ranges whose zero padding is kept (``01-03`` gives ``01 02 03``).
    """
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        parts = re.split(r"\[([^\]]*)\]", item)
        expanded = [""]
        for i, part in enumerate(parts):
            if i % 2 == 0:
                expanded = [e + part for e in expanded]
                continue
            choices: list[str] = []
            for rng in part.split(","):
                lo, _, hi = rng.partition("-")
                if not hi:
                    choices.append(lo)
                    continue
                width = len(lo)
                choices.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
            expanded = [e + c for e in expanded for c in choices]
        hosts.extend(h for h in expanded if h)
    return hosts


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


def _env_master(env: Mapping[str, str]) -> tuple[str | None, int | None]:
    return env.get("MASTER_ADDR") or None, _int(env, "MASTER_PORT")


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """Read the launcher from ``env`` (default ``os.environ``) without side effects.

    Order matters: MPI is checked before Slurm because ``mpirun`` inside a Slurm allocation
    inherits ``SLURM_*`` of the batch step, and torchrun before both because it may itself run
    under either.
    """
    env = os.environ if env is None else env
    addr, port = _env_master(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]),
                      _int(env, "LOCAL_RANK", default=0), addr, port)
    if "OMPI_COMM_WORLD_RANK" in env:
        return Launch("openmpi", int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                      _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0), addr, port)
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return Launch("mpich", int(env["PMI_RANK"]), int(env["PMI_SIZE"]),
                      _int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", default=0), addr, port)
    # SLURM_STEP_ID is set by srun only: the batch script itself (rank 0 of nothing) is not a launch.
    # The world is the step's task count: salloc's interactive step (a shell, one task) keeps the
    # allocation's SLURM_NTASKS.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        if addr is None:
            addr = expand_hostlist(env.get("SLURM_STEP_NODELIST") or env["SLURM_NODELIST"])[0]
        if port is None:
            port = slurm_port(int(env.get("SLURM_JOB_ID", "0")))
        return Launch("slurm", int(env["SLURM_PROCID"]), _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
                      _int(env, "SLURM_LOCALID", default=0), addr, port)
    if any(k in env for k in ("PMIX_RANK", "MV2_COMM_WORLD_RANK", "ALPS_APP_PE")) \
            or env.get("AUTOPAR_LAUNCHER") == "mpi":
        return _launch_from_mpi4py(addr, port)
    return Launch("none", 0, 1, 0, addr or "127.0.0.1", port)


SLURM_PORTS = (15000, 32000)
"""Where a Slurm step's rendezvous port is taken from: below Linux's default ephemeral range
(32768-60999, ``net.ipv4.ip_local_port_range``), where the OS hands ports to any process's
sockets. The former ``10000 + job % 50000`` fell inside it for most job ids and once met a
port another process on the node held (EADDRINUSE, the whole step failed)."""


def slurm_port(job_id: int) -> int:
    """The rendezvous port every task of a Slurm job derives alike from its job id."""
    low, high = SLURM_PORTS
    return low + job_id % (high - low)


def _launch_from_mpi4py(addr: str | None, port: int | None) -> Launch:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    launch = Launch("mpi4py", comm.Get_rank(), comm.Get_size(), local.Get_rank(), addr, port)
    local.Free()
    return launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _own_address() -> str:
    """An address the other hosts can reach: the one our route to the outside uses, falling
    back to the resolved host name. A UDP connect sends no packet."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def resolve_rendezvous(launch: Launch) -> Launch:
    """Fill in a missing master address/port. Under MPI, rank 0 picks and broadcasts them;
    elsewhere a single process uses the loopback and a free port."""
    if launch.master_addr is not None and launch.master_port is not None:
        return launch
    if launch.world_size == 1:
        return Launch(launch.launcher, 0, 1, launch.local_rank,
                      launch.master_addr or "127.0.0.1", launch.master_port or _free_port())
    if launch.launcher not in ("openmpi", "mpich", "mpi4py"):
        raise RuntimeError(
            f"launcher {launch.launcher!r} gave no MASTER_ADDR/MASTER_PORT for {launch.world_size} "
            "ranks; export them before starting the job")
    from mpi4py import MPI

    mine = None
    if launch.rank == 0:
        single_host = launch.local_rank == 0 and "OMPI_COMM_WORLD_LOCAL_SIZE" in os.environ and \
            os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"] == str(launch.world_size)
        mine = (launch.master_addr or ("127.0.0.1" if single_host else _own_address()),
                launch.master_port or _free_port())
    addr, port = MPI.COMM_WORLD.bcast(mine, root=0)
    return Launch(launch.launcher, launch.rank, launch.world_size, launch.local_rank, addr, port)


def connect_store(addr: str, port: int, rank: int, world_size: int, timeout: timedelta) -> "dist.Store":
    """The rendezvous store for ``init_process_group(store=...)``, bounded by ``timeout`` on
    every rank, with the reason when it cannot be had.

    Why not ``init_method="tcp://..."``: when MASTER_PORT is already bound by another process,
    rank 0 fails at once with EADDRINUSE, but a listener that accepts connections and never
    answers (another service, or a stale job) leaves the other ranks' client blocked in its
    handshake forever, past any timeout. The client is built on a helper thread (the
    constructor releases the GIL) and abandoned at the deadline; the process can still exit, as
    the thread is a daemon blocked in a read.
    """
    import torch.distributed as dist

    if rank == 0:
        try:
            return dist.TCPStore(addr, port, world_size, is_master=True, timeout=timeout,
                                 wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
                raise
            raise RuntimeError(
                f"rank 0 cannot serve the rendezvous store on {addr}:{port}: the port is already in "
                f"use by another process (EADDRINUSE); set MASTER_PORT to a free port, or end the "
                f"process that holds it") from e
    # First a plain connect, retried to the deadline: a refused port (bound, not listening)
    # never reaches torch's client, whose retries outlast the timeout and whose thread, if
    # abandoned mid-retry, aborts the process at exit.
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            socket.create_connection((addr, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))).close()
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(_unreachable(rank, addr, port, timeout, f"{type(e).__name__}: {e}")) from e
            time.sleep(0.1)
    box: list[Any] = []

    def attempt() -> None:
        try:
            box.append(dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread below
            box.append(e)

    helper = threading.Thread(target=attempt, name="autopar-store-connect", daemon=True)
    helper.start()
    helper.join(max(0.0, deadline - time.monotonic()))
    if box and not isinstance(box[0], BaseException):
        return box[0]
    cause = f"{type(box[0]).__name__}: {str(box[0]).splitlines()[0]}" if box else \
        "it accepted the connection but never answered"
    raise RuntimeError(_unreachable(rank, addr, port, timeout, cause)) from (box[0] if box else None)


def _unreachable(rank: int, addr: str, port: int, timeout: timedelta, cause: str) -> str:
    return (f"rank {rank}: rank 0's rendezvous store at {addr}:{port} was not reachable within "
            f"{timeout.total_seconds():g} s ({cause}). The port may be in use by another process "
            f"(rank 0 then fails with EADDRINUSE), or rank 0 has not started or cannot be reached "
            f"from this host; check rank 0's log and MASTER_ADDR/MASTER_PORT")
