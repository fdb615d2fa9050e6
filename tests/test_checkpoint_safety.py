"""Checkpoints touch only what they own, and a failed load changes nothing.

- A save into a folder autopar did not write (the user's run folder, a regular file, the working
  directory, a checkpoint the user put a file into) raises on every rank before anything is
  written, and the folder is left byte for byte as it was. Overwriting an earlier checkpoint works.
- Clean-up deletes only leftovers carrying autopar's marker file.
- Names in ``index.json`` that leave the folder are refused.
- A damaged shard, a deleted RNG file or a flipped bit in ``extra.pt`` raises a clear error on
  every rank, and the weights, the optimizer state, the step count and the RNG are unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import zlib

import pytest
import torch

import autopar
from autopar.checkpoint.owned import MARKER
from test_checkpoint import LR, batches, gpt2, in_process

GRID2 = dict(x=2)


def _engine(grid: dict) -> autopar.Engine:
    if not autopar.runtime.is_initialized():
        autopar.init(**grid)
    with autopar.auto_parallelize():
        model = gpt2(0)
    return autopar.parallelize(model, lambda ps: torch.optim.AdamW(ps, **LR))


def _tree(path) -> dict[str, int]:
    """Every file under ``path`` with its CRC32 (or, for a single file, just it)."""
    if os.path.isfile(path):
        return {"": zlib.crc32(open(path, "rb").read())}
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path) + "/"] = 0
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = zlib.crc32(open(full, "rb").read())
    return out


def _user_folder(path) -> None:
    os.makedirs(os.path.join(path, "sub"))
    with open(os.path.join(path, "notes.txt"), "w") as f:
        f.write("my notes")
    with open(os.path.join(path, "sub", "metrics.csv"), "w") as f:
        f.write("step,loss\n")


def _refused(grid: dict, path: str, cwd: str | None = None) -> str:
    eng = _engine(grid)
    if cwd is not None:
        os.chdir(cwd)
    with pytest.raises(autopar.CheckpointError) as info:
        autopar.save_checkpoint(eng, path)
    return str(info.value)


# --- saves -------------------------------------------------------------------------------------
def test_user_folder_is_refused_on_every_rank(pool2, tmp_path):
    run = tmp_path / "run"
    _user_folder(run)
    before, siblings = _tree(run), sorted(os.listdir(tmp_path))
    for message in pool2.run(_refused, GRID2, str(run)):
        assert "refusing to save a checkpoint to" in message and "is not an autopar checkpoint" in message
        assert "notes.txt" in message
    assert _tree(run) == before and sorted(os.listdir(tmp_path)) == siblings  # not even a staging folder


def test_file_cwd_and_foreign_files_are_refused(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"user data")
    assert "it is a file" in in_process(_refused, {}, str(target))
    assert target.read_bytes() == b"user data"
    work = tmp_path / "work"
    _user_folder(work)
    before = _tree(work)
    here = os.getcwd()
    try:
        assert "working directory" in in_process(_refused, {}, ".", str(work))
        assert "working directory" in in_process(_refused, {}, str(tmp_path), str(work))  # a parent of the cwd
    finally:
        os.chdir(here)
    assert _tree(work) == before
    ck = tmp_path / "ck"
    in_process(lambda: autopar.save_checkpoint(_engine({}), ck))
    (ck / "README.txt").write_text("which run this was")
    before = _tree(ck)
    assert "also holds README.txt" in in_process(_refused, {}, str(ck))
    assert _tree(ck) == before
    os.symlink(ck, tmp_path / "link")
    assert "symbolic link" in in_process(_refused, {}, str(tmp_path / "link"))


def _save_twice(path: str) -> None:
    eng = _engine({})
    autopar.save_checkpoint(eng, path, extra={"n": 1})
    eng.step(batches()[0])
    autopar.save_checkpoint(eng, path, extra={"n": 2})


def test_overwrite_and_clean_up_only_what_is_marked(tmp_path):
    ck = tmp_path / "ck"
    (tmp_path / "ck.tmp-mine").mkdir()          # the user's folder that happens to match the pattern
    (tmp_path / "ck.tmp-mine" / "data.txt").write_text("keep me")
    (tmp_path / "ck.tmp-0a1b2c").mkdir()        # a killed save's staging folder
    (tmp_path / "ck.tmp-0a1b2c" / MARKER).write_text("autopar")
    (tmp_path / "empty").mkdir()
    in_process(_save_twice, str(ck))
    in_process(lambda: autopar.save_checkpoint(_engine({}), tmp_path / "empty"))  # an empty folder is fine
    assert sorted(os.listdir(tmp_path)) == ["ck", "ck.tmp-mine", "empty"]
    assert (tmp_path / "ck.tmp-mine" / "data.txt").read_text() == "keep me"
    assert in_process(lambda: autopar.load_checkpoint(gpt2(1), ck)) == {"n": 2}
    assert MARKER in os.listdir(ck)


# --- loads -------------------------------------------------------------------------------------
def test_index_names_must_stay_inside(tmp_path):
    good = tmp_path / "good"
    in_process(lambda: autopar.save_checkpoint(_engine({}), good))
    outside = tmp_path / "secret.safetensors"
    shutil.copy(good / "rank-00000.safetensors", outside)
    for name, problem in {"../secret.safetensors": "not a plain file name",
                          str(outside): "not a plain file name"}.items():
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(good, bad)
        index = json.loads((bad / "index.json").read_text())
        index["files"] = {name: size for size in index["files"].values()}
        for entry in index["tensors"].values():
            for piece in entry["pieces"]:
                piece["file"] = name
        (bad / "index.json").write_text(json.dumps(index))
        with pytest.raises(autopar.CheckpointError, match=problem):
            in_process(lambda: autopar.load_checkpoint(gpt2(1), bad))
    os.symlink(outside, good / "rank-00009.safetensors")  # a link inside the folder leading out of it
    index = json.loads((good / "index.json").read_text())
    index["files"]["rank-00009.safetensors"] = 0
    (good / "index.json").write_text(json.dumps(index))
    with pytest.raises(autopar.CheckpointError, match="resolves outside the checkpoint folder"):
        in_process(lambda: autopar.load_checkpoint(gpt2(1), good))


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _state(eng: autopar.Engine) -> list[torch.Tensor]:
    opt = [v.clone() for s in eng.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [p.detach().clone() for p in eng.model.parameters()] + opt + [torch.get_rng_state()]


def _failed_load_changes_nothing(grid: dict, path: str) -> dict[str, str]:
    """Save after one step; for each kind of damage, take one more step (so the live state differs
    from the checkpoint), try to load the damaged copy and check nothing changed."""
    eng = _engine(grid)
    rank = autopar.current_grid().rank
    eng.step(autopar.shard_batch(batches()[0]))
    autopar.save_checkpoint(eng, path, extra={"next": 1, "note": "x" * 64})
    last = f"rank-{autopar.current_grid().world_size - 1:05d}.safetensors"
    damage = {"shard": lambda d: _flip(os.path.join(d, last), os.path.getsize(os.path.join(d, last)) - 3),
              "rng": lambda d: os.remove(os.path.join(d, "rng-00000.pt")),
              "extra": lambda d: _flip(os.path.join(d, "extra.pt"), os.path.getsize(os.path.join(d, "extra.pt")) // 2)}
    messages = {}
    for kind, spoil in damage.items():
        bad = f"{path}-{kind}"
        if rank == 0:
            shutil.copytree(path, bad)
            spoil(bad)
        if autopar.current_grid().world_size > 1:
            torch.distributed.barrier()
        eng.step(autopar.shard_batch(batches()[1]))
        before, steps = _state(eng), eng.step_count
        with pytest.raises(autopar.CheckpointError) as info:
            autopar.load_checkpoint(eng, bad)
        after = _state(eng)
        assert eng.step_count == steps and len(after) == len(before)
        for a, b in zip(after, before):
            assert torch.equal(a, b), kind
        messages[kind] = str(info.value)
    return messages


def _check_messages(messages: dict[str, str]) -> None:
    assert "checksum mismatch" in messages["shard"]
    assert "missing file" in messages["rng"] and "rng-00000.pt" in messages["rng"]
    assert "corrupted file" in messages["extra"] and "extra.pt" in messages["extra"] and "CRC32" in messages["extra"]


def test_failed_load_changes_nothing(tmp_path):
    _check_messages(in_process(_failed_load_changes_nothing, {}, str(tmp_path / "ck")))


def test_failed_load_changes_nothing_on_every_rank(pool2, tmp_path):
    """x=2: only rank 1 reads the damaged last piece of rank-00001, and only rank 0 its RNG file;
    both ranks raise, and neither changed anything."""
    for messages in pool2.run(_failed_load_changes_nothing, GRID2, str(tmp_path / "ck")):
        _check_messages(messages)


# --- a slow writer outlasts the grid's collective timeout ---------------------------------------
def _slow_writer_saves(path: str) -> int:
    """The grid's collectives time out after 2 s; rank 1 takes 5 s to write its shard. The save's
    own collectives (sync and background) wait on the long-timeout checkpoint group instead."""
    import autopar.checkpoint.save as save

    autopar.init(x=2, timeout=2)
    eng = _engine(GRID2)
    eng.step(autopar.shard_batch(batches()[0]))
    if autopar.current_grid().rank == 1:
        real = save.write_pieces

        def slow(file: str, pieces: list[torch.Tensor]) -> tuple[int, list[list[int]]]:
            time.sleep(5)
            return real(file, pieces)
        save.write_pieces = slow
    try:
        autopar.save_checkpoint(eng, path)
        autopar.save_checkpoint(eng, path, async_save=True).wait()
    finally:
        save.write_pieces = real if autopar.current_grid().rank == 1 else save.write_pieces
    return autopar.load_checkpoint(eng, path) == {}


def test_slow_writer_outlasts_the_collective_timeout(pool2, tmp_path):
    assert pool2.run(_slow_writer_saves, str(tmp_path / "ck")) == [True, True]
