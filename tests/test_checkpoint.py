"""Checkpoints: save under one grid, resume under another, and match an uninterrupted serial run.

A run is 4 AdamW steps of a tiny GPT-2 (tied embeddings, HF ``Conv1D``) on fixed global
batches. The reference is plain PyTorch on one process. A resharded run takes steps 1-2 on one
grid, saves, and takes steps 3-4 on another grid after loading into a model built from a
*different* seed, so nothing but the checkpoint can make its losses and final weights match the
reference: AdamW's moments have to survive the reshard for steps 3-4 to agree.
"""
from __future__ import annotations

import functools
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


def run(grid: dict, path: str, first: int, last: int, load: bool, save: bool, options: dict | None = None,
        hf: str | None = None):
    """Steps ``first..last-1`` on ``grid``; loads ``path`` before and/or saves it after (and
    exports a Hugging Face folder to ``hf``)."""
    eng = engine(grid, seed=0 if first == 0 else 123, **(options or {}))
    extra = autopar.load_checkpoint(eng, path) if load else None
    losses = [eng.step(autopar.shard_batch(b)) for b in batches()[first:last]]
    if save:
        autopar.save_checkpoint(eng, path, extra={"next_batch": last})
    if hf:
        autopar.save_pretrained(eng, hf, max_shard_size="20KB")
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


def reshard(pool_a, grid_a, pool_b, grid_b, path, opts_a=None, opts_b=None, hf=None):
    first = pool_a(run, grid_a, path, 0, SAVE_AT, False, True, opts_a, hf)
    ref_losses, _ = reference()
    assert first[0][0] == pytest.approx(ref_losses[:SAVE_AT], rel=1e-5, abs=1e-6)
    if hf:
        check_hf_export(hf, first[0][1])
    second = pool_b(run, grid_b, path, SAVE_AT, STEPS, True, False, opts_b)
    losses, full, extra, steps = second[0]
    assert all(r[0] == losses for r in second)
    assert extra == {"next_batch": SAVE_AT} and steps == STEPS
    check_against_reference(losses, full)


@pytest.fixture
def ranks8(pool8):
    """The 8-rank pool with room for its start: 8 processes importing torch and transformers can
    take minutes on a busy 2-core machine, all charged to the first call."""
    return functools.partial(pool8.run, timeout=600)


def one(fn, *args):
    return [in_process(fn, *args)]


# --- the resharding matrix -------------------------------------------------------------------
def test_dp_x_to_z_y(ranks8, tmp_path):
    reshard(ranks8, dict(dp=4, x=2), ranks8, dict(dp=2, z=2, y=2), str(tmp_path / "ck"))


def run_with_async_save(grid: dict, path: str) -> list[float]:
    """Saves after step 2 in the background while step 3 runs; the checkpoint must hold the
    state of step 2 (the snapshot), not whatever the weights are when the write happens."""
    eng = engine(grid, seed=0)
    losses = [eng.step(autopar.shard_batch(b)) for b in batches()[:SAVE_AT]]
    pending = autopar.save_checkpoint(eng, path, extra={"next_batch": SAVE_AT}, async_save=True)
    eng.step(autopar.shard_batch(batches()[SAVE_AT]))
    pending.wait()
    return losses


def test_async_save_x_z_to_y(ranks8, tmp_path):
    path = str(tmp_path / "ck")
    ranks8(run_with_async_save, dict(dp=2, x=2, z=2), path)
    losses, full, extra, steps = ranks8(run, dict(dp=4, y=2), path, SAVE_AT, STEPS, True, False)[0]
    assert extra == {"next_batch": SAVE_AT} and steps == STEPS
    check_against_reference(losses, full)


def test_zero_and_offload_to_tensor_parallel(ranks8, tmp_path):
    """ZeRO shards of the optimizer state (flat ranges across tensors) and host-stepped master
    weights reshard like everything else."""
    reshard(ranks8, dict(dp=4, y=2), ranks8, dict(dp=2, x=2, z=2), str(tmp_path / "ck"),
            opts_a=dict(zero=1), opts_b=dict(offload="optimizer+step"))


def test_xyz_to_world_of_one_and_back(ranks8, tmp_path):
    reshard(ranks8, dict(x=2, y=2, z=2), one, {}, str(tmp_path / "a"))
    reshard(one, {}, ranks8, dict(x=2, y=2, z=2), str(tmp_path / "b"))


def test_state_offload_to_plain_world_of_one(tmp_path):
    reshard(one, {}, one, {}, str(tmp_path / "ck"), opts_a=dict(offload="optimizer"))


def save_untrained(grid: dict, path: str) -> None:
    autopar.save_checkpoint(engine(grid, seed=0), path)


def test_pp_save_before_the_split(ranks8, tmp_path):
    """Before its first step a pipeline engine holds the whole model on every stage."""
    ranks8(save_untrained, dict(pp=2, dp=2, x=2), str(tmp_path / "ck"))
    model = gpt2(1)
    autopar.load_checkpoint(model, tmp_path / "ck")
    for (name, x), y in zip(model.state_dict().items(), gpt2(0).state_dict().values()):
        assert torch.equal(x, y), name


def test_pp_x_to_dp_z_and_hf_export(ranks8, tmp_path):
    """Also exports the pp=2 x x=2 model (tied wte/lm_head on two stages) to Hugging Face."""
    reshard(ranks8, dict(pp=2, dp=2, x=2), ranks8, dict(dp=4, z=2), str(tmp_path / "ck"),
            hf=str(tmp_path / "hf"))


def test_xyz_to_pp4(ranks8, tmp_path):
    reshard(ranks8, dict(x=2, y=2, z=2), ranks8, dict(pp=4), str(tmp_path / "ck"))


# --- Hugging Face export -------------------------------------------------------------------------
def check_hf_export(folder: str, full: dict[str, torch.Tensor]) -> None:
    """Plain ``transformers`` in this one process loads the folder with identical weights."""
    files = sorted(os.listdir(folder))
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1  # max_shard_size forced several files
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    state = loaded.state_dict()
    tied = loaded.config.tie_word_embeddings
    assert (loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()) == tied
    assert set(state) == set(full)
    for name, ref in full.items():
        assert torch.equal(state[name], ref), name


def test_hf_export_tensor_parallel(ranks8, tmp_path):
    results = ranks8(run, dict(x=2, y=2, z=2), str(tmp_path / "ck"), 0, 1, False, False, None, str(tmp_path / "hf"))
    check_hf_export(str(tmp_path / "hf"), results[0][1])


def export_llama(path: str):
    autopar.init(x=2, y=2, z=2)
    torch.manual_seed(0)
    with autopar.auto_parallelize():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, tie_word_embeddings=False))
    eng = autopar.parallelize(model, lambda ps: torch.optim.AdamW(ps))
    autopar.save_pretrained(eng, path, max_shard_size="20KB")
    full = autopar.full_state_dict(eng)
    return full if autopar.current_grid().rank == 0 else None


def test_hf_export_untied_llama(ranks8, tmp_path):
    check_hf_export(str(tmp_path / "hf"), ranks8(export_llama, str(tmp_path / "hf"))[0])



# --- from_pretrained: each rank reads only its slices ----------------------------------------------
def _pretrained_models() -> dict[str, tuple]:
    """name -> (model saved to the folder, class loaded from it). The BERT case loads a sequence
    classifier from a masked-LM checkpoint: its pooler/classifier weights are absent."""
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(3)
    return {
        "gpt2": (transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=256, n_positions=16, n_embd=64, n_layer=2, n_head=4)), transformers.GPT2LMHeadModel),
        "llama": (transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=256, num_key_value_heads=2, max_position_embeddings=16, **common)), transformers.LlamaForCausalLM),
        "bert": (transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=256, max_position_embeddings=16, **common)), transformers.BertForSequenceClassification),
    }


def load_sliced(folder: str, grid: dict) -> dict:
    autopar.init(**grid)
    rank = autopar.current_grid().rank
    out = {}
    for name, (saved, cls) in _pretrained_models().items():
        path = os.path.join(folder, name)
        if rank == 0:
            saved.save_pretrained(path, max_shard_size="100KB")  # several files, with an index
        torch.distributed.barrier()
        model = autopar.from_pretrained(cls, path)
        report = model._autopar_load_report
        full = autopar.full_state_dict(model)
        serial = cls.from_pretrained(path).eval()
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got, ref = model.eval()(input_ids=ids).logits, serial(input_ids=ids).logits
        loaded = [k for k in serial.state_dict() if k not in report.initialised]
        for k in loaded:
            assert torch.equal(full[k], serial.state_dict()[k]), f"{name}: {k} differs from transformers' load"
        if report.initialised:  # fresh head: HF's init (std 0.02, zero bias), identical on every rank
            w = full["classifier.weight"]
            assert 0.01 < w.std() < 0.03 and not full["classifier.bias"].any()
            ws = [None] * autopar.current_grid().world_size
            torch.distributed.all_gather_object(ws, w)
            assert all(torch.equal(w, other) for other in ws)
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        out[name] = (report.read_bytes / report.file_bytes, sorted(report.initialised))
    autopar.destroy()
    return out


def test_from_pretrained_reads_only_local_slices(ranks8, tmp_path):
    """x=2, y=2, z=2: each sharded weight is read as its (y, x) block, and of that only the rows
    holding the rank's 1/z piece; ~1/8 of the files plus the replicated norms and biases."""
    for rank_result in ranks8(load_sliced, str(tmp_path), dict(x=2, y=2, z=2)):
        for name, (fraction, initialised) in rank_result.items():
            assert fraction < 0.2, (name, fraction)
            assert initialised == (["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias",
                                    "classifier.weight"] if name == "bert" else []), (name, initialised)


# --- atomicity: a save killed midway ---------------------------------------------------------------
KILLED_SAVE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import autopar, autopar.checkpoint.save as save
    import test_checkpoint as t
    eng = t.engine({{}}, seed=0)
    for b in t.batches()[:t.SAVE_AT]:
        eng.step(b)
    autopar.save_checkpoint(eng, {path!r}, extra={{"next_batch": t.SAVE_AT}})
    eng.step(t.batches()[t.SAVE_AT])
    real = save.write_pieces
    def dying(path, pieces):
        real(path, pieces[:len(pieces) // 2])   # half of the file lands, then the process dies
        os._exit(3)
    save.write_pieces = dying
    autopar.save_checkpoint(eng, {path!r}, extra={{"next_batch": t.SAVE_AT + 1}})
""")


def test_kill_during_save_then_resume(tmp_path):
    """The process dies while writing its second checkpoint: the first one is intact, and a
    new job resuming from it continues exactly like the uninterrupted serial run."""
    path = str(tmp_path / "ck")
    script = KILLED_SAVE.format(tests=os.path.dirname(__file__), path=path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert any(".tmp-" in p for p in os.listdir(tmp_path))  # the killed save's staging directory
    losses, full, extra, steps = in_process(run, {}, path, SAVE_AT, STEPS, True, False)
    assert extra == {"next_batch": SAVE_AT} and steps == STEPS
    check_against_reference(losses, full)


def test_kill_between_the_two_renames(tmp_path):
    """The one instant with no checkpoint at the path: the previous one was moved aside and the
    new one not yet moved in. Loading falls back to the complete previous checkpoint."""
    in_process(_save_tiny, str(tmp_path / "ck"))
    os.rename(tmp_path / "ck", tmp_path / "ck.old-0123")
    assert in_process(lambda: autopar.load_checkpoint(gpt2(0), tmp_path / "ck")) == {}


# --- bad input ---------------------------------------------------------------------------------------
def _save_tiny(path: str) -> None:
    autopar.init()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=8, n_embd=16, n_layer=4, n_head=2))
    autopar.save_checkpoint(autopar.parallelize(model, lambda ps: torch.optim.AdamW(ps)), path)


def _load_error(path: str, layers: int = 4, width: int = 16) -> str:
    if not autopar.runtime.is_initialized():
        autopar.init()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=8, n_embd=width, n_layer=layers, n_head=2))
    with pytest.raises(autopar.CheckpointError) as info:
        autopar.load_checkpoint(autopar.parallelize(model, lambda ps: torch.optim.AdamW(ps)), path)
    return str(info.value)


def _damage(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_bad_checkpoints_name_the_problem(tmp_path):
    good = str(tmp_path / "good")
    in_process(_save_tiny, good)
    shard = os.path.join(good, "rank-00000.safetensors")
    assert "another model: 24 tensor(s) missing" in in_process(_load_error, good, 6)
    assert "another model: transformer.wte.weight has shape [64, 16] there, [64, 32] here" \
        in in_process(_load_error, good, 4, 32)
    assert "no checkpoint" in in_process(_load_error, str(tmp_path / "nothing"))
    cases = {"missing shard": lambda p: os.remove(p),
             "partial": lambda p: os.truncate(p, os.path.getsize(p) // 2),
             "checksum mismatch": lambda p: _damage(p, os.path.getsize(p) - 7),
             "corrupted shard": lambda p: _damage(p, 9)}
    for problem, damage in cases.items():
        bad = str(tmp_path / problem.replace(" ", "_"))
        subprocess.run(["cp", "-r", good, bad], check=True)
        damage(os.path.join(bad, os.path.basename(shard)))
        assert problem in in_process(_load_error, bad), problem


def _save_then_fail_to_load(path: str) -> str:
    autopar.init(x=2)
    with autopar.auto_parallelize():
        model = gpt2(0)
    eng = autopar.parallelize(model, lambda ps: torch.optim.AdamW(ps))
    autopar.save_checkpoint(eng, path)
    if autopar.current_grid().rank == 0:
        os.remove(os.path.join(path, "rank-00001.safetensors"))
    torch.distributed.barrier()
    with pytest.raises(autopar.CheckpointError) as info:
        autopar.load_checkpoint(eng, path)
    return str(info.value)


def test_missing_shard_raises_on_every_rank(ranks8, tmp_path):
    """Only the x=1 ranks read the deleted file, yet every rank raises (and none hangs)."""
    for message in ranks8(_save_then_fail_to_load, str(tmp_path / "ck")):
        assert "missing shard" in message and "rank-00001" in message


def test_plain_module_without_init(tmp_path):
    a, b = gpt2(0), gpt2(1)
    autopar.save_checkpoint(a, tmp_path / "ck")
    assert autopar.load_checkpoint(b, tmp_path / "ck") == {}
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert json.load(open(tmp_path / "ck" / "index.json"))["param_groups"] is None
