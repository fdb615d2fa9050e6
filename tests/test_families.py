"""Model families whose structure the other modules do not cover, split by the pipeline and cut
by tensor parallelism at once (pp=2 x x=2, 2 microbatches, padded batches), against serial.

Each brings a path of its own: Falcon's fused multi-query QKV; T5's relative position bias,
computed in the first block of each stack and handed to every later block (glue across the stage
boundary) and its embedding shared by encoder, decoder and head; Gemma 3's alternating sliding
and global attention, which like blocks must not share a trace over; DeepSeek-V3's latent
attention with a dense first block and fused experts behind a router that computes in fp32;
ALBERT's one layer reused across the depth, which splits only where ``split_points`` says.

Causal models run in float64 with the loss in the logits' dtype (HF's casts to fp32, whose
rounding per microbatch AdamW would amplify to ~1e-6). Models that compute in fp32 inside
(Gemma 3's norms, DeepSeek's router) or whose HF loss is not causal run in fp32, bounded at
1e-3 of each tensor's update (measured: ~1e-5).

Every other test turns dropout off; the last one leaves GPT-2's default 0.1 on.
"""
from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import transformers

import autopar
from test_coverage import adamw, relative_errors, worst
from test_pipeline_paths import causal_lm_items, causal_lm_loss

V = 64
COMMON = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=32, pad_token_id=0, bos_token_id=0, eos_token_id=0)
FAMILIES: dict[str, tuple[str, dict, torch.dtype, dict]] = {
    # name: (model type, config, dtype, parallelize kwargs)
    "falcon": ("falcon", dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                              hidden_dropout=0.0, attention_dropout=0.0), torch.float64, {}),
    "t5": ("t5", dict(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8, decoder_start_token_id=0,
                      dropout_rate=0.0), torch.float32, {}),
    "gemma3": ("gemma3_text", dict(num_hidden_layers=4, num_key_value_heads=1, head_dim=8, sliding_window=3,
                                   layer_types=["sliding_attention", "full_attention"] * 2), torch.float32, {}),
    "deepseek_v3": ("deepseek_v3", dict(num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=16, first_k_dense_replace=1, kv_lora_rank=8,
                                        q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                        n_group=1, topk_group=1), torch.float32, {}),
    "albert": ("albert", dict(embedding_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
               torch.float32, dict(split_points=["predictions"])),
}
BOUNDS = {torch.float64: 1e-9, torch.float32: 1e-3}
# Linear / Embedding classes that stay whole on x=2 (every other one is sharded); Falcon's
# FalconLinear re-implements F.linear and stayed whole before ``subclass.computes_linear``.
WHOLE: dict[str, list[str]] = {}


def build(name: str) -> torch.nn.Module:
    kind, extra, _, _ = FAMILIES[name]
    cfg = transformers.AutoConfig.for_model(kind, **{**COMMON, **extra})
    if kind == "t5":
        return transformers.AutoModelForSeq2SeqLM.from_config(cfg)
    if kind == "albert":
        return transformers.AutoModelForMaskedLM.from_config(cfg)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def batches(steps: int = 2, n: int = 8) -> list[dict[str, torch.Tensor]]:
    """Rows of real length 2..7 padded to 7 then 5: padding falls unevenly over the microbatches."""
    g = torch.Generator().manual_seed(7)
    out = []
    for seq in (7, 5)[:steps]:
        ids = torch.randint(1, V, (n, seq), generator=g)
        real = torch.randint(2, seq + 1, (n,), generator=g)
        mask = (torch.arange(seq)[None, :] < real[:, None]).long()
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
                    "labels": ids.masked_fill(mask == 0, -100)})
    return out


def train_family(name: str) -> tuple[str, float, list[tuple[float, float]]]:
    _, _, dtype, kwargs = FAMILIES[name]
    autopar.init(pp=2, x=2)
    own_loss = dtype == torch.float64  # causal models only (see the module docstring)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        ser = build(name)
        torch.manual_seed(0)
        with autopar.auto_parallelize():
            par = build(name)
    finally:
        torch.set_default_dtype(default)
    from autopar.intra_layer.layers import spec_of

    whole = sorted({type(m).__name__ for m in par.modules()
                    if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and spec_of(m.weight) is None})
    initial = {k: v.detach().clone() for k, v in ser.state_dict().items()}
    if own_loss:
        kwargs = dict(kwargs, loss_fn=causal_lm_loss, loss_items=causal_lm_items)
    engine = autopar.parallelize(par, adamw, num_microbatches=2, **kwargs)
    opt = adamw(ser.parameters())
    losses = []
    for batch in batches():
        loss = engine.step(autopar.shard_batch(batch))
        if own_loss:
            ref = causal_lm_loss(ser(**{k: v for k, v in batch.items() if k != "labels"}), batch)
        else:
            ref = ser(**batch).loss
        ref.backward()
        opt.step()
        opt.zero_grad()
        losses.append((loss, ref.item()))
    wname, err = worst(relative_errors(autopar.full_state_dict(engine), ser.state_dict(), initial))
    return wname, err, losses, whole


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_in_a_pipeline_with_tensor_parallel_equals_serial(pool4, name):
    wname, err, losses, whole = pool4.run(train_family, name, timeout=600)[0]
    assert whole == WHOLE.get(name, []), f"{name}: layer classes left whole: {whole}"
    dtype = FAMILIES[name][2]
    for par, ser in losses:
        assert par == pytest.approx(ser, rel=BOUNDS[dtype]), f"{name}: losses {losses}"
    assert err <= BOUNDS[dtype], f"{name} {dtype}: {wname} relative error {err:.3g}; losses {losses}"
    print(f"{name} {dtype}: worst {wname} {err:.2e}")


def test_reused_layer_without_split_points_names_the_fix(pool4):
    """ALBERT left to the automatic split: one repeated layer cannot make two stages, and the
    error names split_points rather than only asking for fewer stages."""
    with pytest.raises(AssertionError, match=r"has only 1 layers; .*split_points=\[\.\.\.\].*ALBERT"):
        pool4.run(_albert_automatic, timeout=120)


def _albert_automatic() -> None:
    autopar.init(pp=2, x=2)
    with autopar.auto_parallelize():
        model = build("albert")
    autopar.parallelize(model, functools.partial(torch.optim.SGD, lr=0.1), num_microbatches=2)


# --- dropout on, as HF's default configs have it ------------------------------------------------

def _gpt2_with_dropout() -> torch.nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2,
                                                                n_head=2))  # resid/embd/attn dropout 0.1


def dropout_runs(grid: dict, kwargs: dict) -> tuple[list[tuple[float, float]], list[str]]:
    """Three AdamW steps with dropout, the RNG reseeded before each step on both sides. Returns
    (engine, serial) losses and the replicated parameters that differ between ranks of one stage."""
    from autopar.intra_layer.layers import spec_of

    autopar.init(**grid)
    torch.manual_seed(0)
    ser = _gpt2_with_dropout()
    torch.manual_seed(0)
    with autopar.auto_parallelize():
        par = _gpt2_with_dropout()
    engine = autopar.parallelize(par, adamw, **kwargs)
    opt = adamw(ser.parameters())
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(3):
        ids = torch.randint(0, V, (8, 6), generator=g)
        batch = {"input_ids": ids, "labels": ids}
        torch.manual_seed(100 + step)
        loss = engine.step(autopar.shard_batch(batch))
        torch.manual_seed(100 + step)
        ref = ser(**batch).loss
        ref.backward()
        opt.step()
        opt.zero_grad()
        losses.append((loss, ref.item()))
    held = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    mine = {n: p.detach() for n, p in engine.model.named_parameters() if spec_of(p) is None and id(p) in held}
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, (engine.grid.coords["pp"], mine))
    differ = sorted({n for pp, theirs in everyone if pp == engine.grid.coords["pp"]
                     for n, t in theirs.items() if not torch.equal(t, mine[n])})
    return losses, differ


def test_dropout_tensor_parallel_equals_serial_and_peers_stay_identical(pool4):
    """With dropout on, ranks that hold replicated activations draw the same masks (one seed on
    every rank, and the 3D layers consume the RNG as the serial layers do): pure tensor
    parallelism equals serial step for step from the same RNG state, and on a pipeline with
    recompute every replicated parameter stays bit-identical across its tensor-parallel peers.
    (With dp or z > 1 each replica draws its slice's mask from the same state, so masks are not
    serial's rows; training is valid dropout, not serial-exact.)"""
    for ranks in pool4.run(dropout_runs, dict(x=2, y=2), {}):
        losses, differ = ranks
        assert not differ, f"x2y2: replicated parameters drifted apart: {differ}"
        for par, ser in losses:
            assert par == pytest.approx(ser, rel=1e-6), f"x2y2 with dropout: losses {losses}"
    for losses, differ in pool4.run(dropout_runs, dict(pp=2, x=2), dict(num_microbatches=2, recompute=True)):
        assert not differ, f"pp2x2 recompute: replicated parameters drifted apart between x peers: {differ}"


def pretrained_falcon(folder: str) -> list[str]:
    """``from_pretrained`` builds on the meta device: Falcon's layers are proven to be linear on
    a CPU probe there too, sharded, and loaded with the saved values."""
    from autopar.intra_layer.layers import spec_of

    autopar.init(x=2, y=2)
    if torch.distributed.get_rank() == 0:
        torch.manual_seed(3)
        build("falcon").save_pretrained(folder)
    torch.distributed.barrier()
    cls = transformers.FalconForCausalLM
    serial = cls.from_pretrained(folder).state_dict()
    with autopar.auto_parallelize():
        par = cls.from_pretrained(folder)
    full = autopar.full_state_dict(par)
    assert full.keys() == serial.keys()
    differ = [k for k in serial if not torch.equal(full[k], serial[k])]
    assert not differ, f"from_pretrained under auto_parallelize changed {differ}"
    return sorted({type(m).__name__ for m in par.modules() if isinstance(m, torch.nn.Linear)
                   and spec_of(m.weight) is None})


def test_falcon_from_pretrained_is_sharded_and_equal(pool4, tmp_path):
    assert pool4.run(pretrained_falcon, str(tmp_path / "falcon"))[0] == []
