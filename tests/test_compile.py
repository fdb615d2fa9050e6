"""``torch.compile`` on tensor-parallel grids (gloo ranks): compiled before ``parallelize``
(``torch.compile(model)``) or after it (``model.compile()``), the run equals serial training in
float64 and really is compiled. The first forward, which finds the sharded layout
(``autochain``), runs eagerly; later ones are compiled in the final layout, as one graph with no
graph break (a break in every layer once left the layers' Functions eager). The backend is
``aot_eager`` (Dynamo and AOTAutograd, which is where tracing fails, without inductor's C++
build; ``bench/gpu_check.py`` runs inductor)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import autopar
from mp import GROUP_THREADS, thread_count

VOCAB = 64


def _llama(parallel: bool) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    if not parallel:
        return transformers.LlamaForCausalLM(cfg).double()
    with autopar.auto_parallelize():
        return transformers.LlamaForCausalLM(cfg).double()


def _batch(step: int) -> dict:
    """256 tokens: 128 or more per batch slice, so the eager first step splits the layers' forward
    all-reduces into overlapped chunks (``comm.OVERLAP_MIN_ROWS``); compiled steps do not split."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (16, 16), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _loss(output: Any, batch: dict) -> torch.Tensor:
    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))


def _items(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum()


def compiled_equals_serial(grid: dict, when: str) -> dict:
    from torch._dynamo.utils import counters

    ser = _llama(False)
    start = {k: v.clone() for k, v in ser.state_dict().items()}
    opt = torch.optim.AdamW(ser.parameters(), lr=1e-2, eps=1e-6)
    ref = []
    for step in range(3):
        loss = _loss(ser(**_batch(step)), _batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref.append(loss.item())
    torch._dynamo.reset()
    counters.clear()
    threads = thread_count()
    autopar.init(**grid)
    try:
        model = _llama(True)
        if when == "before":
            model = torch.compile(model, backend="aot_eager")
        engine = autopar.parallelize(model, lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1e-6),
                                     loss_fn=_loss, loss_items=_items)
        if when == "after":
            engine.model.compile(backend="aot_eager")
        losses = [engine.step(autopar.shard_batch(_batch(step))) for step in range(3)]
        full = autopar.full_state_dict(engine)
        assert set(full) == set(ser.state_dict()), "state dict names must be the serial model's"
        graphs = counters["stats"]["unique_graphs"]
        breaks = dict(counters["graph_break"])
        del engine, model
    finally:
        autopar.destroy()
    # Dynamo keeps compiled graphs (and the groups they captured) as globals of the compiled
    # functions' modules; destroy() must drop them.
    leaked = thread_count() - threads
    assert leaked < GROUP_THREADS, f"{grid}: {leaked} more threads after destroy(): a process group is still alive"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-12, atol=1e-12)
    worst = max(float((full[k] - v).norm() / (v - start[k]).norm())
                for k, v in ser.state_dict().items() if (v - start[k]).norm() > 0)
    assert worst < 1e-9, f"{grid} compiled {when}: relative weight error {worst:.2e}"
    return {"graphs": graphs, "breaks": breaks, "worst": worst}


# Every rank compiles the whole model (Dynamo and AOTAutograd, ~10 CPU-s a rank here), so the
# second case runs on 2 ranks: the depth axis alone, whose block gathers the first case lacks.
@pytest.mark.parametrize("grid,when,ranks", [(dict(x=2, y=2), "before", 4), (dict(z=2), "after", 2)])
def test_compiled_model_equals_serial(request, grid, when, ranks):
    pool = request.getfixturevalue(f"pool{ranks}")
    for result in pool.run(compiled_equals_serial, grid, when, timeout=900):
        assert result["graphs"] > 0, "nothing was compiled"
        # Each break used to leave a layer's Functions to run eagerly: 23-26 graphs, one break per
        # layer (is_fake, async collectives). The whole model is one graph now.
        assert not result["breaks"], f"{grid} compiled {when}: graph breaks {list(result['breaks'])}"


def compile_with_pipeline_is_refused() -> str:
    autopar.init(pp=2, dp=2)
    try:
        with pytest.raises(ValueError, match=r"torch.compile\(model\) with pp > 1") as info:
            autopar.parallelize(torch.compile(_llama(False)), lambda p: torch.optim.SGD(p, lr=0.1))
        return str(info.value)
    finally:
        autopar.destroy()


def test_compile_with_pipeline_is_a_clear_error(pool4):
    pool4.run(compile_with_pipeline_is_refused)
