"""A Slurm job preempted the way ``--signal=B:USR1@60`` does it, requeued, and resumed, ends with
the weights of an uninterrupted job.

Runs ``examples/launch/slurm_cpu_1node.sbatch`` on the private one-node Slurm of ``tests/slurm.py``
(2 ranks; the job's own ``--grid dp=2`` overrides the script's x=2). The reference is the same job run to the end, launched directly
(``gpt_reference``, shared with ``test_resume``). The Slurm job gets USR1 on its batch shell
(``scancel --signal=USR1 --batch``, what Slurm sends 60 s before the time limit) after a few steps:
the script's trap signals the ranks, they save and exit 0, the script requeues the job, and the
requeued run resumes from the checkpoint. Its final checkpoint must equal the reference's byte for
byte (so the run under srun also equals the direct launch), and its CSV must hold every step once.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt_job import ARGS, STEPS, safetensors_equal
from slurm import ENDED, REPO, job_state, slurm, wait_job  # noqa: F401 (slurm: fixture)

SCRIPT = REPO / "examples" / "launch" / "slurm_cpu_1node.sbatch"
BIN = str(Path(sys.executable).parent)


def _submit(env: dict[str, str], folder: Path) -> str:
    job_env = {**env, "PATH": f"{BIN}:{env['PATH']}", "CKPT_DIR": str(folder / "ckpt"),
               "ARGS": f"{shlex.join(ARGS)} --steps {STEPS} --out {folder}/metrics.csv"}
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


def test_preempted_job_requeues_and_ends_with_the_uninterrupted_weights(slurm, gpt_reference, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    job = _submit(slurm, run)
    deadline = time.monotonic() + 300
    while len(_rows(run)) < 3 and time.monotonic() < deadline:
        # A job that ended before its third step (it failed) is reported now, with its log.
        assert job_state(slurm, job)[0] not in ENDED, f"job {job} ended before step 3:\n{_log(run)}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True, timeout=30)
    state = _wait(slurm, job, run)
    log = _log(run)
    assert state == "COMPLETED", log
    assert "requeueing job" in log and "preempted (SIGUSR1)" in log and "resumed after step" in log, log
    assert _rows(run) == list(range(1, STEPS + 1)), log
    safetensors_equal(gpt_reference, str(run))
