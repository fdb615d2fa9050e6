"""The GPT-2 example job of both preemption tests: a signal to one rank of a directly launched
job (``test_resume``) and a Slurm preemption with requeue (``test_resume_slurm``).

Both run the same arguments on the same grid, so one uninterrupted run, the ``gpt_reference``
session fixture of ``conftest.py``, is the reference of both: a launch's start-up and 60 steps
are most of each test. That the run under ``srun`` ends byte-equal to the one launched directly
is part of what the Slurm test checks.
"""
from __future__ import annotations

import os
import subprocess
import sys

from slurm import REPO, clean_env, free_ports, kill_session

STEPS = 60
# Everything but --steps, --out and --ckpt-dir, which each run sets (the sbatch script sets them
# from its own variables and passes ARGS after them). The example's --grid wins over the
# launcher's AUTOPAR_GRID (the sbatch script's x=2): dp=2 takes one all-reduce per step where x=2
# takes several per layer, and ran the 60 steps in 60% of the time.
ARGS = ["--grid", "dp=2", "--global-batch", "8", "--seq-len", "64", "--layers", "4", "--hidden", "128",
        "--heads", "4", "--save-every", "1000"]
SCRIPT = REPO / "examples" / "train_gpt.py"


def launch(out: str, steps: int = STEPS) -> list[subprocess.Popen]:
    """The job's 2 ranks started directly (no launcher in between, so each rank's pid is known)."""
    port = free_ports(1)[0]
    procs = []
    for rank in range(2):
        env = clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), *ARGS, "--steps", str(steps), "--out",
                                       f"{out}/metrics.csv", "--ckpt-dir", f"{out}/ckpt"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """Each rank's (exit code, output); ranks still running after ``timeout`` are killed."""
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                kill_session(p.pid)
    return results


def safetensors_equal(ref: str, run: str, step: int = STEPS) -> None:
    """The two runs' checkpoints of ``step`` hold the same files, byte for byte."""
    final = f"step-{step:08d}"
    names = sorted(n for n in os.listdir(f"{ref}/ckpt/{final}") if n.endswith(".safetensors"))
    assert names and names == sorted(n for n in os.listdir(f"{run}/ckpt/{final}") if n.endswith(".safetensors"))
    for name in names:
        with open(f"{ref}/ckpt/{final}/{name}", "rb") as a, open(f"{run}/ckpt/{final}/{name}", "rb") as b:
            assert a.read() == b.read(), name
