"""Checkpoints: save under one grid, resume under another, and match an uninterrupted serial run.

A run is 4 AdamW steps of a tiny GPT-2 (tied embeddings, HF ``Conv1D``) on fixed global
batches. The reference is plain PyTorch on one process. A resharded run takes steps 1-2 on one
grid, saves, and takes steps 3-4 on another grid after loading into a model built from a
*different* seed, so nothing but the checkpoint can make its losses and final weights match the
reference: AdamW's moments have to survive the reshard for steps 3-4 to agree.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

import autopar

STEPS = 4
SAVE_AT = 2
LR = dict(lr=1e-2, weight_decay=0.1, eps=1e-3)  # eps: no amplified noise on zero-gradient key biases


def gpt2(seed: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=4, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, 64, (8, 8), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def serial_reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = gpt2(0)
    opt = torch.optim.AdamW(model.parameters(), **LR)
    losses = []
    for batch in batches():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


REFERENCE = None


def reference():
    global REFERENCE
    if REFERENCE is None:
        REFERENCE = serial_reference()
    return REFERENCE


def engine(grid: dict, seed: int, **options) -> autopar.Engine:
    if not autopar.runtime.is_initialized():
        autopar.init(**grid)
    with autopar.auto_parallelize():
        model = gpt2(seed)
    micro = 2 if grid.get("pp", 1) > 1 else 1
    return autopar.parallelize(model, lambda ps: torch.optim.AdamW(ps, **LR), num_microbatches=micro, **options)


def run(grid: dict, path: str, first: int, last: int, load: bool, save: bool, options: dict | None = None):
    """Steps ``first..last-1`` on ``grid``; loads ``path`` before and/or saves it after."""
    eng = engine(grid, seed=0 if first == 0 else 123, **(options or {}))
    extra = autopar.load_checkpoint(eng, path) if load else None
    losses = [eng.step(autopar.shard_batch(b)) for b in batches()[first:last]]
    if save:
        autopar.save_checkpoint(eng, path, extra={"next_batch": last})
    full = autopar.full_state_dict(eng)
    return losses, (full if autopar.current_grid().rank == 0 else None), extra, eng.step_count


def in_process(fn, *args):
    """A world of one in the test process itself (plain ``python`` launch)."""
    try:
        return fn(*args)
    finally:
        autopar.destroy()


def check_against_reference(losses, full):
    ref_losses, ref_state = reference()
    assert losses == pytest.approx(ref_losses[SAVE_AT:], rel=1e-5, abs=1e-6)
    for name, ref in ref_state.items():
        if name in full:
            torch.testing.assert_close(full[name], ref, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert "transformer.wte.weight" in full


def reshard(pool_a, grid_a, pool_b, grid_b, path, opts_a=None, opts_b=None):
    first = pool_a(run, grid_a, path, 0, SAVE_AT, False, True, opts_a)
    ref_losses, _ = reference()
    assert first[0][0] == pytest.approx(ref_losses[:SAVE_AT], rel=1e-5, abs=1e-6)
    second = pool_b(run, grid_b, path, SAVE_AT, STEPS, True, False, opts_b)
    losses, full, extra, steps = second[0]
    assert all(r[0] == losses for r in second)
    assert extra == {"next_batch": SAVE_AT} and steps == STEPS
    check_against_reference(losses, full)


def one(fn, *args):
    return [in_process(fn, *args)]


# --- the resharding matrix -------------------------------------------------------------------
def test_dp_x_to_z_y(pool4, tmp_path):
    reshard(pool4.run, dict(dp=2, x=2), pool4.run, dict(z=2, y=2), str(tmp_path / "ck"))


def test_zero_and_offload_to_tensor_parallel(pool4, tmp_path):
    """ZeRO shards of the optimizer state (flat ranges across tensors) and host-stepped master
    weights reshard like everything else."""
    reshard(pool4.run, dict(dp=2, y=2), pool4.run, dict(x=2, z=2), str(tmp_path / "ck"),
            opts_a=dict(zero=1), opts_b=dict(offload="optimizer+step"))


def test_xyz_to_world_of_one_and_back(pool8, tmp_path):
    reshard(pool8.run, dict(x=2, y=2, z=2), one, {}, str(tmp_path / "a"))
    reshard(one, {}, pool8.run, dict(x=2, y=2, z=2), str(tmp_path / "b"))


def test_pp_x_to_dp_z(pool4, tmp_path):
    reshard(pool4.run, dict(pp=2, x=2), pool4.run, dict(dp=2, z=2), str(tmp_path / "ck"))


def test_xyz_to_pp4(pool8, tmp_path):
    reshard(pool8.run, dict(x=2, y=2, z=2), pool8.run, dict(pp=4), str(tmp_path / "ck"))
