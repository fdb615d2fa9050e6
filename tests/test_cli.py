"""The ``autopar`` console script: AUTOPAR_GRID in ``autopar.init``, the launch commands it
builds for each launcher, ``check`` on 2 and 4 ranks (pass and fail; launched for real once, the
other cases' ranks run in the rank pool), and ``plan``'s figures."""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import subprocess
import sys

import pytest

import autopar
from autopar.cli import main
from autopar.cli.launch import Job, choose_launcher, command, job_env
from autopar.cli.plan import predict, shape_of
from autopar.runtime.gridspec import parse_grid
from slurm import REPO, clean_env, run

AUTOPAR = [sys.executable, "-m", "autopar.cli"]


def test_parse_grid():
    assert parse_grid("pp=2, x=2") == {"pp": 2, "x": 2} and parse_grid("") == {}
    for bad in ("q=2", "x=0", "x", "x=two", "x=2,x=2"):
        with pytest.raises(ValueError, match="grid"):
            parse_grid(bad)


def test_launcher_starts_without_torch():
    """``autopar run`` only parses, checks the grid and starts the launcher: importing torch and
    transformers first cost it 3.6 s (9 s with ``--help`` building the plan options) before any rank
    started. Neither may load on that path, nor for ``--help`` or a bad grid."""
    probe = ("import sys, contextlib, io\n"
             "import autopar.cli\n"
             "for argv in (['run', '-n', '2', '--grid', 'x=2', '--dry-run', 'train.py'], ['--help'],\n"
             "             ['run', '-n', '3', '--grid', 'x=2', 'train.py'], ['check', '--help']):\n"
             "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
             "        try:\n"
             "            autopar.cli.main(argv)\n"
             "        except SystemExit:\n"
             "            pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
             # then the lazy package still reaches its subpackages as the eager one did
             "import autopar\n"
             "print(autopar.pipeline.SCHEDULES[0], autopar.runtime.state.GRID_ENV, autopar.init.__module__)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == ["[]", "gpipe AUTOPAR_GRID autopar.runtime.state"], out.stdout + out.stderr


def test_init_reads_autopar_grid(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AUTOPAR_GRID", "x=2")
    with pytest.raises(ValueError, match="1"):  # x=2 does not fit a world of one
        autopar.init()
    assert autopar.init(x=1).sizes["x"] == 1  # explicit arguments win
    autopar.destroy()
    monkeypatch.setenv("AUTOPAR_GRID", "x=2;y=2")
    with pytest.raises(ValueError, match="AUTOPAR_GRID: bad grid entry"):
        autopar.init()
    monkeypatch.setenv("AUTOPAR_GRID", "dp=1")
    assert autopar.init().world_size == 1
    autopar.destroy()


def test_launcher_choice_and_commands():
    job = Job(nprocs=4, script=["train.py", "--steps", "2"], grid={"pp": 2, "x": 2})
    assert choose_launcher(job, {"SLURM_JOB_ID": "7"}) == "srun"
    assert choose_launcher(job, {}) == "local"
    assert choose_launcher(Job(nprocs=4, nodes=2, script=["t.py"]), {}) == "torchrun"
    env = job_env(job, {"PATH": "/usr/bin"})
    assert env["AUTOPAR_GRID"] == "pp=2,x=2"
    assert command(job, "srun", env)[:6] == ["srun", "-n", "4", "-N", "1", "--kill-on-bad-exit=1"]
    assert command(job, "srun", env)[-3:] == ["train.py", "--steps", "2"]
    multi = Job(nprocs=8, nodes=2, script=["t.py"], master_addr="host0", master_port=1234)
    cmd = command(multi, "torchrun", {})
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "host0:1234" and cmd[cmd.index("--nproc-per-node") + 1] == "4"
    with pytest.raises(ValueError, match="master-addr"):
        command(Job(nprocs=8, nodes=2, script=["t.py"]), "torchrun", {})
    mpi = command(job, "mpirun", {"PATH": str(REPO / ".venv" / "bin") + ":/usr/bin"})  # pip Open MPI
    assert "-x" in mpi and "AUTOPAR_GRID" in mpi and mpi[-3:] == ["train.py", "--steps", "2"]
    with pytest.raises(ValueError, match="not divisible by pp\\*x\\*y\\*z = 4"):
        Job(nprocs=6, script=["t.py"], grid={"pp": 2, "x": 2})
    with pytest.raises(ValueError, match="split evenly"):
        Job(nprocs=3, nodes=2, script=["t.py"])


def test_run_dry_run_and_bad_grid(capsys):
    assert main(["run", "-n", "2", "--grid", "x=2", "--dry-run", "train.py", "--lr", "1"]) == 0
    assert "local: 2 x AUTOPAR_GRID=x=2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "-n", "2", "--grid", "x=3", "train.py"])
    assert "world size 2 is not divisible" in capsys.readouterr().err


def check_in_pool(grid: str, argv: list[str]) -> tuple[int, str]:
    """A pool rank's share of ``autopar check --grid GRID ARGV``: the per-rank entry point the
    launcher starts (``python -m autopar.cli.check``), with ``AUTOPAR_GRID`` set as it sets it."""
    from autopar.cli import check

    os.environ["AUTOPAR_GRID"] = grid
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            rc = check.main(argv)
    finally:
        del os.environ["AUTOPAR_GRID"]
    return rc, printed.getvalue()


def test_check_passes_on_a_grid(pool2):
    rc, out = pool2.run(check_in_pool, "x=2", ["--model", "gpt2", "--steps", "2"])[0]
    assert rc == 0, out
    assert "construction: bit-identical to serial" in out and "PASS" in out, out
    assert re.search(r"transformer\.h\.0\.attn\.c_attn\.weight\s+\[32, 96\]\s+\S+\s+\S+\s+yes", out), out


def test_check_passes_for_bert_classification_on_a_pipeline(pool2):
    """BERT's pooler slices its input: the pipeline's tracing pass used to trip over that."""
    rc, out = pool2.run(check_in_pool, "pp=2", ["--model", "bert", "--steps", "2"])[0]
    assert rc == 0, out
    assert "PASS" in out and re.search(r"bert\.pooler\.dense\.weight\s+\[32, 32\]\s+\S+\s+\S+\s+yes", out), out


def test_check_fails_beyond_tolerance_with_a_user_factory():
    """Launched for real (``autopar check`` starts the ranks): a user's plain model on dp=2 with a
    zero bound; the sums of 2 ranks differ from serial in the last bits, so the table shows the
    errors and the exit code, through the launcher, is non-zero."""
    rc, out = run([*AUTOPAR, "check", "-n", "2", "--factory", "scripts.check_factory:build", "--bound", "0",
                   "--steps", "2"], clean_env(PYTHONPATH=f"{REPO}:{REPO / 'tests'}"), timeout=400)
    assert rc != 0 and "FAIL" in out and "2.weight" in out, out


def test_check_forwards_its_options_to_every_rank(capsys):
    assert main(["check", "--model", "llama", "--grid", "x=2,y=2", "--steps", "3", "--global-batch", "8",
                 "--microbatches", "2", "--lr", "0.5", "--bound", "1e-7", "--fp64", "--dry-run"]) == 0
    line = capsys.readouterr().err
    assert "local: 4 x AUTOPAR_GRID=x=2,y=2" in line, line
    assert line.split(" -m ", 1)[1].split() == ["autopar.cli.check", "--model", "llama", "--steps", "3",
                                                "--global-batch", "8", "--microbatches", "2", "--lr", "0.5",
                                                "--seed", "1", "--bound", "1e-07", "--fp64"], line


def test_check_fp64_passes_on_llama(pool4):
    """--fp64: both sides in float64, every tensor within 1e-9 of its own update on x=2 y=2."""
    rc, out = pool4.run(check_in_pool, "x=2,y=2", ["--model", "llama", "--steps", "2", "--fp64"])[0]
    assert rc == 0 and "PASS" in out and "float64" in out, out
    worst = float(re.search(r"relative to the update (\S+)", out).group(1))
    assert worst < 1e-12, out


def test_plan_figures(capsys):
    assert main(["plan", "--model", "gpt2", "--world", "8", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "124.4M parameters" in out and "... " in out and len(re.findall(r"^\s+\d+\s+\d+\s+\d+", out, re.M)) == 3
    import torch

    from autopar.cli.models import build
    with torch.device("meta"):
        model = build("gpt2", tiny=False)
    shape = shape_of(model, 1024)
    params = sum(p.numel() for p in model.parameters())
    plain = predict(shape, {"pp": 1, "dp": 8, "z": 1, "y": 1, "x": 1}, 8, 1)
    assert plain["params"] == params and plain["adamw"] == 8 * params
    assert math.isclose(plain["comm dp"], 4 * 2 * 7 / 8 * params) and plain["comm x/y"] == 0
    x8 = predict(shape, {"pp": 1, "dp": 1, "z": 1, "y": 1, "x": 8}, 8, 1)
    assert x8["params"] < params / 6  # the weights are most of GPT-2, and they shard 8 ways
    # y=2 would cut the vocabulary, 50257 rows: the tied embedding stays replicated, as in auto_parallelize
    tp = predict(shape, {"pp": 1, "dp": 1, "z": 2, "y": 2, "x": 2}, 8, 1)
    assert tp["params"] > 50257 * 768 and tp["comm z"] > 0 and tp["comm x/y"] > 0
