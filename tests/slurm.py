"""Shared by the tests that start real launchers: a clean launcher-free environment, a bounded
run that kills the whole session on timeout, free ports, and a private one-node Slurm.

The ``slurm`` fixture is module-scoped: a test module imports it (``from slurm import slurm``)
and gets its own Slurm, started once for the module and stopped after it.
"""
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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


def free_ports(n: int) -> list[int]:
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


# cred_expire is also how long Slurm holds a requeued job (default 120 s). A job that becomes
# eligible with no event to trigger scheduling waits for the next main or backfill pass (60 s and
# 30 s by default): the requeue test's second run pended 37 s. Once a second here, it pends 11 s.
SLURM_CONF = """\
ClusterName=autopar
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
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
SchedulerParameters=sched_interval=1,bf_interval=1
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
    ctld_port, d_port = free_ports(2)
    # first_job: job ids, and so the srun rendezvous ports derived from them, differ between runs
    # and between the Slurms of one run (a pid-derived id gave every module the same ids). From
    # the OS, not ``random``: an in-process ``autopar.init`` seeds ``random`` in the test process,
    # which made the id the same in every run.
    first_job = random.SystemRandom().randrange(1000, 1_000_000)
    conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], root=root, ctld_port=ctld_port,
                                      d_port=d_port, first_job=first_job, cpus=os.cpu_count()))
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


def job_state(env: dict[str, str], job: str) -> tuple[str, int]:
    """(state, exit code of the batch script) of ``job``; ("GONE", -1) once Slurm forgot it."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
    if "JobState" not in fields:
        return "GONE", -1
    return fields["JobState"], int(fields.get("ExitCode", "0:0").split(":")[0])


# Slurm's final job states (a requeued job passes through REQUEUED and PENDING, which are not).
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "GONE")


def wait_job(env: dict[str, str], job: str, timeout: float = TIMEOUT_S) -> tuple[str, int]:
    """Poll ``job`` every 0.2 s until it ends. Not ``sbatch -W``: that polls with growing sleeps
    and returned 10 s after a job that ran 0.1 s."""
    deadline = time.monotonic() + timeout
    while (state := job_state(env, job))[0] not in ENDED:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env, timeout=30)
            pytest.fail(f"job {job} still {state[0]} after {timeout} s")
        time.sleep(0.2)
    return state


def sbatch(args: list[str], env: dict[str, str], timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """Submit ``sbatch args`` and wait for the job: (the batch script's exit code, sbatch's output)."""
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    if out.returncode:
        return out.returncode, out.stdout + out.stderr
    state, code = wait_job(env, out.stdout.strip().split(";")[0], timeout)
    return (0 if state == "COMPLETED" else code or 1), out.stdout + out.stderr + f"job {state}\n"
