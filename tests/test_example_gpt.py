"""The main demo job, ``examples/train_gpt.py``, runs end to end as a plain process: a tiny model
for two steps, checked through the CSV it writes."""
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE")


def test_train_gpt_two_steps(tmp_path):
    # A world of one even when pytest itself runs under a launcher.
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(("OMPI_", "SLURM_", "PMIX_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "metrics.csv"
    cmd = [sys.executable, str(ROOT / "examples" / "train_gpt.py"), "--grid", "dp=1", "--microbatches", "1", "--steps", "2", "--global-batch", "2",
           "--seq-len", "32", "--layers", "1", "--hidden", "32", "--heads", "2", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) and float(r["tokens_per_s"]) > 0 for r in rows)
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "summary: 2 steps" in proc.stdout
