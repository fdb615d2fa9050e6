"""A Slurm job preempted the way ``--signal=B:USR1@60`` does it, requeued, and resumed, ends with
the weights of an uninterrupted job.

Runs ``examples/launch/slurm_cpu_1node.sbatch`` on the private one-node Slurm of ``tests/slurm.py``
(2 ranks, x=2). The reference job runs to the end. The second job gets USR1 on its batch shell
(``scancel --signal=USR1 --batch``, what Slurm sends 60 s before the time limit) after a few steps:
the script's trap signals the ranks, they save and exit 0, the script requeues the job, and the
requeued run resumes from the checkpoint. Its final checkpoint must equal the reference's byte for
byte, and its CSV must hold every step once.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm import REPO, slurm, wait_job  # noqa: F401 (slurm: fixture)

SCRIPT = REPO / "examples" / "launch" / "slurm_cpu_1node.sbatch"
STEPS = 60
ARGS = f"--steps {STEPS} --global-batch 8 --seq-len 64 --layers 4 --hidden 128 --heads 4"
BIN = str(Path(sys.executable).parent)


def _submit(env: dict[str, str], folder: Path) -> str:
    job_env = {**env, "PATH": f"{BIN}:{env['PATH']}", "CKPT_DIR": str(folder / "ckpt"), "SAVE_EVERY": "1000",
               "ARGS": f"{ARGS} --out {folder}/metrics.csv"}
    out = subprocess.run(["sbatch", "--parsable", "--ntasks=2", f"--output={folder}/job.out", "--time=10",
                          str(SCRIPT)], cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().split(";")[0]


def _wait(env: dict[str, str], job: str, folder: Path, timeout: float = 500) -> str:
    try:
        return wait_job(env, job, timeout)[0]
    except pytest.fail.Exception as e:
        raise AssertionError(f"{e}:\n{_log(folder)}") from None


def _log(folder: Path) -> str:
    return (folder / "job.out").read_text() if (folder / "job.out").exists() else "(no log)"


def _rows(folder: Path) -> list[int]:
    try:
        return [int(line.split(",")[0]) for line in (folder / "metrics.csv").read_text().splitlines()[1:]]
    except FileNotFoundError:
        return []


def test_preempted_job_requeues_and_ends_with_the_uninterrupted_weights(slurm, tmp_path):  # noqa: F811
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    job = _submit(slurm, ref)
    assert _wait(slurm, job, ref) == "COMPLETED", _log(ref)
    job = _submit(slurm, run)
    deadline = time.monotonic() + 300
    while len(_rows(run)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True, timeout=30)
    state = _wait(slurm, job, run)
    log = _log(run)
    assert state == "COMPLETED", log
    assert "requeueing job" in log and "preempted (SIGUSR1)" in log and "resumed after step" in log, log
    assert _rows(run) == list(range(1, STEPS + 1)), log
    final = f"step-{STEPS:08d}"
    names = sorted(n for n in os.listdir(ref / "ckpt" / final) if n.endswith(".safetensors"))
    assert names and names == sorted(n for n in os.listdir(run / "ckpt" / final) if n.endswith(".safetensors"))
    for name in names:
        assert (ref / "ckpt" / final / name).read_bytes() == (run / "ckpt" / final / name).read_bytes(), name
