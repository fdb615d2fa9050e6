"""Launcher detection from synthetic environments, Slurm host lists, and grids that cannot be built.

The variable sets below are what each launcher really exports (measured with torchrun, the pip
Open MPI, and Slurm 22.05's srun/sbatch); tests/test_real_launch.py checks the same paths with
real launches.
"""
import pytest
import torch

import autopar
from autopar.runtime.grid import resolve_sizes
from autopar.runtime.launcher import Launch, detect_launch, expand_hostlist, slurm_port

SRUN_STEP = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_STEP_ID": "0", "SLURM_NODELIST": "gpu[07-08,10]", "SLURM_STEP_NODELIST": "gpu[08,10]",
             "SLURM_JOB_NODELIST": "gpu[07-08,10]", "SLURM_JOB_ID": "123456"}
# What the batch script of `sbatch -n 8` sees: rank 0 of an 8-task allocation, but no step.
SBATCH_BATCH_STEP = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
                     "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
                     "SLURM_JOB_ID": "123456"}


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"},
     Launch("torchrun", 3, 4, 1, "10.0.0.1", 29400)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     Launch("openmpi", 2, 4, 1, None, None)),
    ({"PMI_RANK": "6", "PMI_SIZE": "8", "MPI_LOCALRANKID": "2"}, Launch("mpich", 6, 8, 2, None, None)),
    ({"PMI_RANK": "6", "PMI_SIZE": "8", "MPI_LOCALRANKID": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"},
     Launch("mpich", 6, 8, 2, "n1", 1234)),
], ids=["torchrun", "openmpi", "mpich", "mpich-with-master"])
def test_launchers_that_export_ranks(env, expected):
    """Rank, world and local rank come from each launcher's own names; under MPI the address is left
    open (None) unless exported, so that rank 0 can broadcast it over mpi4py."""
    assert detect_launch(env) == expected


def test_srun_step():
    """Under srun the master is the first host of the step's node list (a step may not use the
    allocation's first node) and the port is derived from the job id, so every rank agrees
    without talking."""
    launch = detect_launch(SRUN_STEP)
    assert launch == Launch("slurm", 5, 8, 1, "gpu08", slurm_port(123456))
    assert detect_launch({**SRUN_STEP, "SLURM_JOB_ID": "123457"}).master_port == launch.master_port + 1
    # Never in Linux's ephemeral range, where any process's socket may hold the port already.
    ephemeral = 32768
    assert all(1024 < slurm_port(job) < ephemeral for job in range(0, 200_000, 7))


def test_srun_without_step_nodelist_uses_nodelist():
    env = {k: v for k, v in SRUN_STEP.items() if k != "SLURM_STEP_NODELIST"}
    assert detect_launch(env).master_addr == "gpu07"


def test_srun_respects_exported_master():
    env = {**SRUN_STEP, "MASTER_ADDR": "head", "MASTER_PORT": "4000"}
    assert (detect_launch(env).master_addr, detect_launch(env).master_port) == ("head", 4000)


def test_sbatch_batch_step_is_not_a_launch():
    """The batch script has SLURM_PROCID=0 and SLURM_NTASKS=8 but no SLURM_STEP_ID. Taking it for
    rank 0 of 8 would make `python train.py` in an sbatch script wait forever for 7 ranks."""
    assert detect_launch(SBATCH_BATCH_STEP) == Launch("none", 0, 1, 0, "127.0.0.1", None)


def test_salloc_interactive_step_is_a_world_of_one():
    """With LaunchParameters=use_interactive_step, salloc -n 3 opens a shell as a one-task step that
    keeps the allocation's SLURM_NTASKS=3 (measured on Slurm 22.05): `python train.py` typed there
    is one process and must not wait for 3."""
    env = {**SBATCH_BATCH_STEP, "SLURM_NTASKS": "3", "SLURM_STEP_ID": "4294967290", "SLURM_STEP_NUM_TASKS": "1"}
    assert (detect_launch(env).launcher, detect_launch(env).world_size) == ("slurm", 1)


def test_mpirun_inside_slurm_allocation_is_mpi():
    """mpirun inside an allocation passes on the allocation's SLURM_* (with a Slurm-aware Open MPI
    even a step id, with SLURM_PROCID=0 on every rank); the MPI variables are the true ones."""
    env = {**SRUN_STEP, "SLURM_PROCID": "0",
           "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
    assert detect_launch(env) == Launch("openmpi", 3, 4, 3, None, None)
    env = {**SBATCH_BATCH_STEP, "PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}
    assert detect_launch(env) == Launch("mpich", 1, 2, 1, None, None)


def test_no_launcher_is_a_world_of_one():
    assert detect_launch({"HOME": "/root"}) == Launch("none", 0, 1, 0, "127.0.0.1", None)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,7]", ["node01", "node02", "node03", "node7"]),
    ("a,b[1-2]", ["a", "b1", "b2"]),
    ("gpu-[008-010]x", ["gpu-008x", "gpu-009x", "gpu-010x"]),
    ("c[1-2]-ib[3-4]", ["c1-ib3", "c1-ib4", "c2-ib3", "c2-ib4"]),
    ("login1,gpu[9-10],cpu", ["login1", "gpu9", "gpu10", "cpu"]),
    ("solo", ["solo"]),
])
def test_expand_hostlist(nodelist, hosts):
    """Commas inside brackets do not split hosts, zero padding is kept, and several bracket groups
    in one name multiply out, first group outermost (as `scontrol show hostnames` orders them)."""
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("world, kwargs, sizes_and_fix", [
    (8, dict(dp=2, x=2), ["pp=1 dp=2 x=2 y=1 z=1", "has 4 ranks but the world has 8", "launch 4 ranks",
                          "leave dp out"]),
    (6, dict(x=4), ["world size 6", "pp*x*y*z = 4", "launch a multiple of 4 ranks"]),
    (4, dict(x=0), ["x=0", "positive integer"]),
    (4, dict(pp=-2), ["pp=-2", "positive integer"]),
    (4, dict(dp=0), ["dp=0", "positive integer"]),
])
def test_bad_grid_message_gives_sizes_and_fix(world, kwargs, sizes_and_fix):
    with pytest.raises(ValueError) as err:
        resolve_sizes(world, **kwargs)
    for part in sizes_and_fix:
        assert part in str(err.value)


def test_resolve_sizes_infers_dp():
    assert resolve_sizes(8, pp=2, x=2) == {"pp": 2, "dp": 2, "z": 1, "y": 1, "x": 2}


def test_init_twice_raises(monkeypatch):
    """A second init would silently build a second set of groups over the same world."""
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    grid = autopar.init()
    try:
        assert (grid.launcher, grid.world_size) == ("none", 1)
        with pytest.raises(RuntimeError, match="already called"):
            autopar.init()
    finally:
        autopar.destroy()
    autopar.destroy()  # safe to call twice
    autopar.init()  # and init works again after destroy
    autopar.destroy()


@pytest.mark.parametrize("backend,cuda,expected", [
    ("nccl", True, "cuda:1"), ("cuda:nccl,cpu:gloo", True, "cuda:1"), ("cpu:gloo,cuda:nccl", True, "cuda:1"),
    ("undefined", True, "cuda:1"), ("undefined", False, "cpu"), ("gloo", True, "cpu"), ("gloo", False, "cpu")])
def test_device_follows_the_worlds_backend(monkeypatch, backend, cuda, expected):
    """A world made by the user's own ``init_process_group()`` (backend left to torch, or a
    per-device list) trains on the GPU; only a pure gloo world or no CUDA means the CPU."""
    from autopar.runtime.state import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    assert choose_device(backend, local_rank=3) == torch.device(expected)
    assert choose_device(backend, local_rank=3, device="cpu") == torch.device("cpu")  # explicit wins


def test_nccl_without_a_visible_gpu_is_a_clear_error(monkeypatch):
    from autopar.runtime.state import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="backend is 'nccl' but this process sees no CUDA device"):
        choose_device("nccl", local_rank=0)


def test_cuda_device_is_set_before_the_nccl_world_with_device_id(monkeypatch):
    """set_device comes before init_process_group, which gets device_id (sub-groups then split
    from the world's communicator); CUDA and the rendezvous are mocked, the world never forms."""
    import torch.distributed as dist

    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    calls: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))

    class Stop(Exception):
        pass

    def fake_init(backend, **kwargs):
        calls.append(("init_process_group", backend, kwargs.get("device_id")))
        raise Stop

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    with pytest.raises(Stop):
        autopar.init()
    assert calls == [("set_device", torch.device("cuda:0")), ("init_process_group", "nccl", torch.device("cuda:0"))]
