"""Runs that survive: ``autopar.resume`` + the data loader's ``start_step`` equal an uninterrupted
run, and a signal to one rank of a real multi-process job makes every rank save and exit.

The resume test runs on dp=2 x x=2 (4 ranks): a run killed after step 5, with step checkpoints
every 2 steps, resumes from step 4 on an engine built from another seed and must end bit-equal to
the uninterrupted 7 steps (same grid, same summation order). A damaged newest checkpoint makes
``resume`` fall back to the older one, still bit-equal. The preemption test starts the GPT-2
example as 2 processes on dp=2 (no launcher in between, so the test knows each rank's pid), sends
SIGUSR1 to rank 1 only, and checks that both ranks saved the same step and exited 0 and that the
resumed job's final checkpoint equals an uninterrupted job's (``gpt_reference``) file for file.
"""
from __future__ import annotations

import os
import signal
import time

import torch
from torch.utils.data import Dataset

import autopar
from gpt_job import STEPS as JOB_STEPS, finish, launch, safetensors_equal
from test_checkpoint import LR, gpt2

GRID = dict(dp=2, x=2)
STEPS = 7


class Tokens(Dataset):
    """20 fixed sequences: 8 per global batch, so the run crosses two epoch boundaries."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (20, 8), generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _engine(seed: int) -> autopar.Engine:
    if not autopar.runtime.is_initialized():
        autopar.init(**GRID)
    with autopar.auto_parallelize():
        model = gpt2(seed)
    return autopar.parallelize(model, lambda ps: torch.optim.AdamW(ps, **LR))


def _train(eng: autopar.Engine, first: int, last: int, folder: str | None) -> None:
    """Steps ``first+1 .. last`` on the loader started at ``first``; a step checkpoint every 2."""
    data = autopar.data.loader(Tokens(), 8, seed=3, start_step=first)
    step = first
    while step < last:
        for batch in data:
            eng.step(batch)
            step += 1
            if folder is not None and step % 2 == 0:
                autopar.save_step(eng, folder, keep_last=2)
            if step == last:
                break


def _full(eng: autopar.Engine) -> dict[str, torch.Tensor] | None:
    full = autopar.full_state_dict(eng)
    return full if autopar.current_grid().rank == 0 else None


def _uninterrupted() -> dict[str, torch.Tensor] | None:
    eng = _engine(0)
    _train(eng, 0, STEPS, None)
    return _full(eng)


def _killed_after(folder: str, steps: int) -> None:
    _train(_engine(0), 0, steps, folder)  # the process "dies" here: step 5 is never saved


def _resumed(folder: str) -> tuple[int, dict[str, torch.Tensor] | None]:
    eng = _engine(123)
    start = autopar.resume(eng, folder, keep_last=2)
    _train(eng, start, STEPS, None)
    return start, _full(eng)


def _assert_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(ref)
    for name, tensor in ref.items():
        assert torch.equal(got[name], tensor), name


def test_resume_equals_uninterrupted(pool4, tmp_path):
    ref = pool4.run(_uninterrupted)[0]
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.csv").write_text("the user's file\n")
    pool4.run(_killed_after, str(folder), 5)
    assert sorted(os.listdir(folder)) == ["metrics.csv", "step-00000002", "step-00000004"]
    start, full = pool4.run(_resumed, str(folder))[0]
    assert start == 4
    _assert_equal(full, ref)
    # The newest checkpoint damaged: resume warns, falls back to step 2, and still ends equal.
    shard = folder / "step-00000004" / "rank-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))
    start, full = pool4.run(_resumed, str(folder))[0]
    assert start == 2
    _assert_equal(full, ref)
    assert sorted(os.listdir(folder)) == ["metrics.csv", "step-00000002", "step-00000004"]  # damaged one kept


def _resume_empty(folder: str) -> int:
    return autopar.resume(_engine(0), folder)


def test_resume_with_nothing_to_resume(pool4, tmp_path):
    assert pool4.run(_resume_empty, str(tmp_path / "new")) == [0] * 4


# --- a real signal to one rank -------------------------------------------------------------------
def _rows(out: str) -> int:
    try:
        with open(f"{out}/metrics.csv") as f:
            return max(0, len(f.readlines()) - 1)
    except FileNotFoundError:
        return 0


def test_signal_to_one_rank_saves_on_all_and_resumes_equal(gpt_reference, tmp_path):
    run = str(tmp_path / "run")
    procs = launch(run)
    deadline = time.monotonic() + 240
    while _rows(run) < 3 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    sent = time.monotonic()
    procs[1].send_signal(signal.SIGUSR1)
    results = finish(procs)
    elapsed = time.monotonic() - sent
    for rc, log in results:
        assert rc == 0, log
    saved = os.listdir(f"{run}/ckpt")
    assert len(saved) == 1, saved
    stopped = int(saved[0].removeprefix("step-"))
    assert 3 <= stopped < JOB_STEPS, results[0][1]
    # Rank 0 was not signalled, yet it learnt of rank 1's signal at the same step and saved with it.
    assert f"preempted (another rank's signal) after step {stopped}: saved" in results[0][1], results[0][1]
    print(f"signal to exit of both ranks: {elapsed:.2f} s; stopped after step {stopped}")
    resumed = finish(launch(run))
    for rc, log in resumed:
        assert rc == 0, log
    assert f"resumed after step {stopped}" in resumed[0][1], resumed[0][1]
    safetensors_equal(gpt_reference, run)
    with open(f"{run}/metrics.csv") as f:
        assert [int(line.split(",")[0]) for line in f.readlines()[1:]] == list(range(1, JOB_STEPS + 1))
