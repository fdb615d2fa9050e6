"""Vocabulary-parallel cross-entropy (``intra_layer.vocab_loss``) against the serial loss, on 8
gloo ranks: the function on its own (per-token losses and logit gradients, targets in every
shard and ignored ones, float64), then HF causal LMs trained by the engine, tied (GPT-2) and
untied (Llama) heads, padded batches, with a pipeline, and ``Engine.forward``'s full logits.
The logits are never all-gathered over y: the y all-gather bytes drop by exactly them."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import autopar

VOCAB, GLOBAL, LENGTH = 64, 8, 7


def function_matches_serial(y: int) -> float:
    """Shard logits of a parallel head on x=2 x y (dp fills the rest) vs F.cross_entropy."""
    autopar.init(x=2, y=y)
    try:
        torch.manual_seed(0)
        with autopar.auto_parallelize():
            head = nn.Linear(16, VOCAB, bias=False)
        head.double().out_sharded = True
        serial = nn.Linear(16, VOCAB, bias=False).double()
        serial.weight.data.copy_(autopar.full_state_dict(head)["weight"])
        g = torch.Generator().manual_seed(3)
        h = torch.randn(5, 6, 16, generator=g, dtype=torch.float64)
        target = torch.randint(0, VOCAB, (5, 6), generator=g)
        target[0, :3] = -100
        h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
        worst = 0.0
        for reduction in ("mean", "sum", "none"):
            loss = autopar.vocab_parallel_cross_entropy(head(h1), target, head, reduction=reduction)
            ref = F.cross_entropy(serial(h2).reshape(-1, VOCAB), target.reshape(-1), reduction=reduction)
            ref = ref.view(target.shape) if reduction == "none" else ref
            torch.testing.assert_close(loss, ref, rtol=1e-13, atol=1e-13)
            weights = torch.randn(loss.shape, generator=g, dtype=torch.float64)
            (loss * weights).sum().backward()
            (ref * weights).sum().backward()
            torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-12, atol=1e-13)
            worst = max(worst, float((h1.grad - h2.grad).abs().max()))
            h1.grad = h2.grad = None
        with pytest.raises(ValueError, match=rf"expected \(\.\.\., {VOCAB // y}\) logits"):
            autopar.vocab_parallel_cross_entropy(torch.zeros(3, VOCAB, dtype=torch.float64), target[0, :3], head)
        head.out_sharded = False
        with pytest.raises(ValueError, match="does not return vocabulary shards"):
            autopar.vocab_parallel_cross_entropy(head(h1), target, head)
        return worst
    finally:
        autopar.destroy()


@pytest.mark.parametrize("y", [2, 4])
def test_sharded_cross_entropy_equals_serial(pool8, y):
    assert max(pool8.run(function_matches_serial, y)) < 1e-12


def _model(name: str, parallel: bool) -> nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        build = lambda: transformers.GPT2LMHeadModel(cfg)  # noqa: E731  (lm_head tied to wte)
    else:
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
        build = lambda: transformers.LlamaForCausalLM(cfg)  # noqa: E731
    if not parallel:
        return build()
    with autopar.auto_parallelize():
        return build()


def _batch(step: int) -> dict:
    """Right-padded rows of random length with -100 labels on padding and on a prompt."""
    g = torch.Generator().manual_seed(20 + step)
    ids = torch.randint(1, VOCAB, (GLOBAL, LENGTH), generator=g)
    real = torch.randint(2, LENGTH + 1, (GLOBAL,), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < real[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def _fp64_loss(output: Any, batch: dict) -> torch.Tensor:
    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))


def _items(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum()


def _custom_shard_loss(model: nn.Module) -> Any:
    """A user's own loss on the shards the head returns under vocab_parallel_loss=True."""
    head = model.get_output_embeddings()

    def loss_fn(output: Any, batch: dict) -> torch.Tensor:
        return autopar.vocab_parallel_cross_entropy(output.logits[:, :-1], batch["labels"][:, 1:], head)
    return loss_fn


def engine_matches_serial(name: str, grid: dict, dtype: torch.dtype, custom: bool) -> dict:
    from autopar.intra_layer.comm import COUNTER

    ser = _model(name, False).to(dtype)
    start = {k: v.clone() for k, v in ser.state_dict().items()}
    opt = torch.optim.AdamW(ser.parameters(), lr=1e-2, eps=1e-6)
    ref_losses = []
    for step in range(3):
        batch = _batch(step)
        out = ser(**batch)
        loss = out.loss if dtype == torch.float32 else _fp64_loss(out, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    ser.eval()
    result: dict[str, Any] = {}
    for vocab_parallel in (True, False):
        autopar.init(**grid)
        try:
            model = _model(name, True).to(dtype)
            # fp32: chosen by default; float64 must ask (HF's own loss rounds to fp32 there).
            # False: the same run with gathered logits, for the bytes.
            request = (None if dtype == torch.float32 else True) if vocab_parallel else False
            engine = autopar.parallelize(model, lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1e-6),
                                         vocab_parallel_loss=request, num_microbatches=2,
                                         **(dict(loss_fn=_custom_shard_loss(model), loss_items=_items)
                                            if custom and vocab_parallel else {}))
            assert (engine.vocab_head is not None) == vocab_parallel
            losses = []
            for step in range(3):
                COUNTER.reset()
                COUNTER.enabled = step == 2
                losses.append(engine.step(autopar.shard_batch(_batch(step))))
                COUNTER.enabled = False
            result[f"gather-y-{vocab_parallel}"] = COUNTER.bytes.get("all_gather[y]", 0.0)
            if not vocab_parallel:
                continue
            mine = autopar.shard_batch(_batch(9))
            out = engine.forward(mine)
            full = autopar.full_state_dict(engine)
            g = autopar.current_grid()
            last = g.index("pp") == g.size("pp") - 1
            rows = GLOBAL // (g.size("dp") * g.size("z"))
            width = torch.tensor([], dtype=dtype).element_size()
            result["expected"] = rows * LENGTH * VOCAB * width * (g.size("y") - 1) / g.size("y") if last else 0.0
        finally:
            autopar.destroy()
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=tol, atol=tol)
        worst = max(float((full[k] - v).norm() / (v - start[k]).norm())
                    for k, v in ser.state_dict().items() if (v - start[k]).norm() > 0)
        assert worst < (1e-3 if dtype == torch.float32 else 1e-9), f"relative weight error {worst:.2e}"
        assert (out is not None) == last
        if out is not None:
            with torch.no_grad():
                ref_out = ser(**mine)
            assert out.logits.shape == ref_out.logits.shape
            torch.testing.assert_close(out.logits, ref_out.logits, rtol=tol, atol=tol)
            ref_loss = ref_out.loss if dtype == torch.float32 else _fp64_loss(ref_out, mine)
            if not custom:  # a loss_fn's loss is the user's business in forward
                torch.testing.assert_close(out.loss, ref_loss, rtol=tol, atol=tol)
        result["worst"] = worst
    return result


GRIDS = [  # (model, grid, dtype, custom loss_fn on the shards)
    ("llama", dict(x=2, y=2), torch.float64, False),
    ("gpt2", dict(x=2, y=2), torch.float64, True),
    ("llama", dict(y=4), torch.float32, False),
    ("gpt2", dict(pp=2, y=2, x=2), torch.float64, False),
]


@pytest.mark.parametrize("name,grid,dtype,custom", GRIDS)
def test_engine_trains_on_vocabulary_shards(pool8, name, grid, dtype, custom):
    for result in pool8.run(engine_matches_serial, name, grid, dtype, custom):
        # The only y all-gather that goes is the logits': this rank's tokens x V per step.
        assert result["gather-y-False"] - result["gather-y-True"] == result["expected"], result


def refusals() -> list[str]:
    messages = []
    autopar.init(x=2)  # the vocabulary is not cut: nothing to take shards of
    try:
        with pytest.raises(ValueError) as info:
            autopar.parallelize(_model("llama", True), lambda p: torch.optim.SGD(p, lr=0.1), vocab_parallel_loss=True)
        messages.append(str(info.value))
    finally:
        autopar.destroy()
    autopar.init(y=2)
    try:  # float64 keeps HF's loss unless asked: HF rounds float64 logits to fp32 for it
        engine = autopar.parallelize(_model("llama", True).double(), lambda p: torch.optim.SGD(p, lr=0.1))
        assert engine.vocab_head is None
    finally:
        autopar.destroy()
    return messages


def test_vocab_parallel_loss_refuses_what_it_cannot_do(pool2):
    messages = pool2.run(refusals)[0]
    assert "needs an output embedding" in messages[0] and "vocabulary over y > 1" in messages[0]
