"""``bench/gpu_check.py --dry-run``: the one-GPU script runs every section on the CPU at tiny size.

Why: a GPU is lent rarely and for minutes, so the script that spends that time must be known to
work beforehand. The dry run takes the same code paths (gloo instead of NCCL, CPU tensors, the
saved-tensor counter instead of the allocator), so every row must be present and none may fail.
"""
from __future__ import annotations

import subprocess
import sys

from slurm import REPO, clean_env

EXPECTED = [  # (section, check) of every row, in order
    ("a", "1x1x1 bf16 step, eager"),
    ("b", "1x1x1 bf16 step, torch.compile (aot_eager)"),
    ("c", "peak memory, steady bf16 step"),
    ("d", "offload='optimizer' step vs device AdamW"),
    ("d", "offload='optimizer+step' step vs device AdamW"),
    ("e", "world of 1, autopar.init(backend='gloo')"),
    ("e", "world of 1 on gloo: Engine.step"),
    ("e", "world of 1 on gloo: autopar check verdict"),
    ("e", "2 processes on cpu, gloo, dp=2 vs serial (fp64)"),
    ("e", "2 processes on cpu, gloo, x=2 vs serial (fp64)"),
    ("e", "2 processes on cpu, gloo, pp=2 vs serial (fp64)"),
]


def test_dry_run_prints_every_row_and_none_fails() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run"], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=240)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| section")]
    assert [(c[0], c[1]) for c in cells] == EXPECTED, proc.stdout + proc.stderr[-3000:]
    failed = [c for c in cells if not c[-1].startswith("ok")]
    assert not failed, f"{failed}\n{proc.stderr[-3000:]}"
    for c in cells:
        if c[1].endswith("vs serial (fp64)") or c[1].endswith("check verdict"):
            assert float(c[4].removeprefix("max rel err ")) <= 1e-9, c
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_failure_is_a_row_and_the_other_runs_go_on() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check
    import torch

    def broken() -> list[list[str]]:
        raise RuntimeError("no | device")
    assert gpu_check.guarded("x", ["one", "two"], broken) == [
        ["x", "one", "-", "-", "-", "FAIL: RuntimeError: no / device"],
        ["x", "two", "-", "-", "-", "FAIL: RuntimeError: no / device"]]

    calls = []

    def fails_second(batch: dict) -> float:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("compile failed")
        return 1.0
    size = gpu_check.DRY
    medians, losses, errors = gpu_check.time_steps({"bad": fails_second, "good": lambda b: 2.0}, size,
                                                   torch.device("cpu"))
    assert errors == {"bad": "ValueError: compile failed"} and list(medians) == ["good"]
    assert losses["good"] == [2.0] * (size.warmup + size.steps) and len(calls) == 2
