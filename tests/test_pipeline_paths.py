"""The pipeline on the paths users take: padded batches whose length changes every step, token
counts that differ between ranks and microbatches, evaluation between training steps, LR
schedulers on ``engine.optimizer``, a model with a top-level parameter, forward-only outputs,
memory after ``parallelize``, and the posted p2p order of a real run. Every case is compared
with serial training on the same global batches (4 ranks, one pool for the module)."""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import autopar
from autopar.pipeline.program import Post

VOCAB = 64
GLOBAL = 8


def _llama(dtype: torch.dtype = torch.float32, parallel: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    if parallel:
        with autopar.auto_parallelize():
            model = transformers.LlamaForCausalLM(cfg)
        return model.to(dtype)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _padded(step: int, length: int) -> dict:
    """Rows of random real length, right-padded, with a masked prompt: every slice of every
    rank and microbatch holds a different number of real tokens."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(1, VOCAB, (GLOBAL, length), generator=g)
    real = torch.randint(2, length + 1, (GLOBAL,), generator=g)
    real[step % GLOBAL] = 1  # one row with no target token at all after the shift
    mask = (torch.arange(length)[None, :] < real[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :1 + step % 2] = -100  # prompt tokens are not trained on
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


LENGTHS = (8, 5, 7)


def causal_lm_loss(output: Any, batch: dict) -> torch.Tensor:
    """The causal LM loss in the logits' own dtype. HF's loss casts logits to fp32, so a float64
    model's HF loss still rounds each microbatch's gradient to fp32; where microbatch gradients
    cancel, AdamW turns that into ~3e-6 of weight error, which would hide a real bug."""
    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))


def causal_lm_items(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum()


def _loss(model: nn.Module, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    """HF's own loss in fp32 (which the engine's label counter must match); float64 throughout
    otherwise."""
    if dtype == torch.float32:
        return model(**batch).loss
    return causal_lm_loss(model(**{k: v for k, v in batch.items() if k != "labels"}), batch)


def _serial(dtype: torch.dtype, scheduler: bool) -> tuple[list[float], list[float], dict, dict]:
    model = _llama(dtype)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3) if scheduler else None
    losses, evals = [], []
    for step, length in enumerate(LENGTHS):
        loss = _loss(model, _padded(step, length), dtype)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            evals.append(_loss(model, _padded(50 + step, 6), dtype).item())
        model.train()
    return losses, evals, model.state_dict(), start


def check_padded_changing_lengths(grid: dict, dtype: torch.dtype, schedule: str, m: int,
                                  parallel: bool, scheduler: bool) -> dict:
    autopar.init(**grid)
    engine = autopar.parallelize(_llama(dtype, parallel), num_microbatches=m, schedule=schedule,
                                 virtual_stages=2 if schedule == "interleaved" else 1,
                                 optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1e-6),
                                 **({} if dtype == torch.float32 else
                                    dict(loss_fn=causal_lm_loss, loss_items=causal_lm_items)))
    assert engine.optimizer is not None, "engine.optimizer must exist when parallelize returns"
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(engine.optimizer, T_max=3) if scheduler else None
    losses, evals = [], []
    for step, length in enumerate(LENGTHS):
        losses.append(engine.step(autopar.shard_batch(_padded(step, length))))
        if sched is not None:
            sched.step()
        evals.append(engine.eval_step(autopar.shard_batch(_padded(50 + step, 6))))
    full = autopar.full_state_dict(engine)
    lr = engine.optimizer.param_groups[0]["lr"]
    # One trace per shape; only the first, which decides the split, counts FLOPs.
    counted = [plan.flow.flops is not None for plan in engine.pipeline.plans.values()]
    autopar.destroy()
    assert counted == [True] + [False] * (len(counted) - 1) and len(counted) > 2, counted
    ref_losses, ref_evals, ref, start = _serial(dtype, scheduler)
    case = f"{grid} {dtype} {schedule} M={m} tp={parallel} sched={scheduler}"
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=tol, atol=tol,
                               msg=lambda s: f"{case}: losses {losses} vs {ref_losses}")
    torch.testing.assert_close(torch.tensor(evals), torch.tensor(ref_evals), rtol=tol, atol=tol,
                               msg=lambda s: f"{case}: eval losses {evals} vs {ref_evals}")
    worst = 0.0
    for key in ref:
        update = (ref[key] - start[key]).norm()
        if update > 0:
            worst = max(worst, float((full[key] - ref[key]).norm() / update))
    limit = 1e-3 if dtype == torch.float32 else 1e-9
    assert worst < limit, f"{case}: relative weight error {worst:.2e} (limit {limit})"
    if scheduler:
        assert lr == pytest.approx(1e-2 * 0.0), f"{case}: the scheduler did not drive engine.optimizer ({lr})"
    return {"worst": worst}


CASES = [
    (dict(pp=2, dp=2), torch.float32, "1f1b", 2, False, True),
    (dict(pp=2, dp=2), torch.float64, "1f1b", 2, False, False),
    (dict(pp=2, x=2), torch.float64, "gpipe", 2, True, False),
    (dict(pp=2, dp=2), torch.float64, "interleaved", 2, False, False),
    (dict(pp=2, dp=2), torch.float64, "zerobubble", 1, False, False),
]


@pytest.mark.parametrize("grid,dtype,schedule,m,parallel,scheduler", CASES)
def test_padded_batches_of_changing_length_equal_serial(pool4, grid, dtype, schedule, m, parallel, scheduler):
    pool4.run(check_padded_changing_lengths, grid, dtype, schedule, m, parallel, scheduler)


@contextlib.contextmanager
def _warnings() -> Iterator[list[str]]:
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("autopar")
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)


def check_tp_only_token_weighting() -> None:
    """dp=2 x z=2 without pipeline: the same exact normalisation over dp*z slices."""
    autopar.init(dp=2, z=2)
    engine = autopar.parallelize(_llama(torch.float64, parallel=True), num_microbatches=2,
                                 optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1e-6),
                                 loss_fn=causal_lm_loss, loss_items=causal_lm_items)
    losses = [engine.step(autopar.shard_batch(_padded(s, n))) for s, n in enumerate(LENGTHS)]
    final_eval = engine.eval_step(autopar.shard_batch(_padded(50 + len(LENGTHS) - 1, 6)))
    full = autopar.full_state_dict(engine)
    # A global batch with no target at all: serial's mean is 0/0; the engine's loss is 0, said.
    nothing = _padded(99, 6)
    nothing["labels"].fill_(-100)
    with _warnings() as said:
        assert engine.eval_step(autopar.shard_batch(nothing)) == 0.0
    assert any("without a single item to average over" in m for m in said), said
    autopar.destroy()
    ref_losses, ref_evals, ref, _ = _serial(torch.float64, False)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-12, atol=1e-12)
    assert final_eval == pytest.approx(ref_evals[-1], rel=1e-12)
    for key in ref:
        torch.testing.assert_close(full[key], ref[key], rtol=1e-9, atol=1e-11)


def test_token_weighted_loss_without_pipeline(pool4):
    pool4.run(check_tp_only_token_weighting)


class TwoTowers(nn.Module):
    """CLIP's shape: two stacks, projections, and a parameter the root uses itself."""

    def __init__(self) -> None:
        super().__init__()
        self.text_in = nn.Linear(6, 8)
        self.text = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.image_in = nn.Linear(5, 8)
        self.image = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.logit_scale = nn.Parameter(torch.tensor(0.3))

    def forward(self, text: torch.Tensor, image: torch.Tensor, y: torch.Tensor) -> dict:
        t = self.text_in(text)
        for layer in self.text:
            t = torch.tanh(layer(t))
        i = self.image_in(image)
        for layer in self.image:
            i = torch.tanh(layer(i))
        score = self.logit_scale.exp() * (t * i).sum(-1)
        return {"loss": nn.functional.mse_loss(score, y), "score": score}


def _towers_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"text": torch.randn(GLOBAL, 6, generator=g, dtype=torch.float64),
            "image": torch.randn(GLOBAL, 5, generator=g, dtype=torch.float64),
            "y": torch.randn(GLOBAL, generator=g, dtype=torch.float64)}


def check_top_level_parameter(grid: dict, sample: bool) -> None:
    torch.manual_seed(0)
    model = TwoTowers().double()
    serial = copy.deepcopy(model)
    autopar.init(**grid)
    engine = autopar.parallelize(model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), num_microbatches=2,
                                 loss_fn=lambda out, b: out["loss"],
                                 sample_batch=autopar.shard_batch(_towers_batch(0)) if sample else None)
    losses = [engine.step(autopar.shard_batch(_towers_batch(s))) for s in range(3)]
    out = engine.forward(autopar.shard_batch(_towers_batch(9)), broadcast=True)
    full = autopar.full_state_dict(engine)
    autopar.destroy()
    opt = torch.optim.AdamW(serial.parameters(), lr=1e-2)
    ref = []
    for s in range(3):
        loss = serial(**_towers_batch(s))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-12, atol=1e-12)
    for key, value in serial.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-10, atol=1e-12, msg=lambda s: key)
    with torch.no_grad():
        want = serial.eval()(**autopar_shard(_towers_batch(9)))["score"]
    torch.testing.assert_close(out["score"], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sample", [False, True])
def test_top_level_parameter_trains_at_pp2(pool4, sample):
    pool4.run(check_top_level_parameter, dict(pp=2, dp=2), sample)


def check_forward_outputs_and_memory() -> dict:
    autopar.init(pp=2, dp=2)
    serial = _llama()
    full_bytes = sum(p.numel() * p.element_size() for p in serial.parameters())
    batch = _padded(3, 6)
    engine = autopar.parallelize(_llama(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), num_microbatches=2,
                                 sample_batch=autopar.shard_batch(batch))
    held = sum(p.numel() * p.element_size() for p in engine.model.parameters()
               if p.untyped_storage().nbytes() >= p.numel() * p.element_size())
    out = engine.forward(autopar.shard_batch(batch))
    everywhere = engine.forward(autopar.shard_batch(batch), broadcast=True)
    engine.pipeline.p2p.posted = []
    engine.step(autopar.shard_batch(batch))
    posted = engine.pipeline.p2p.posted
    program = [(s.point, s.sends, s.recvs) for s in engine.pipeline.program("train", 2) if isinstance(s, Post)]
    stage = engine.grid.coords["pp"]
    autopar.destroy()
    assert posted == program, "the run posts exactly the program's launches, in its order"
    serial.eval()
    with torch.no_grad():
        want = serial(**autopar_shard(batch)).logits
    if stage == 1:
        torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    else:
        assert out is None
    torch.testing.assert_close(everywhere.logits, want, rtol=1e-5, atol=1e-5)
    return {"held": held, "full": full_bytes}


def autopar_shard(batch: dict) -> dict:
    """The dp=2 shard of this rank, recomputed after the grid is gone (rank // 2 = dp coord)."""
    import torch.distributed as dist
    dp = dist.get_rank() % 2
    return {k: v.chunk(2)[dp] for k, v in batch.items()}


def test_forward_outputs_memory_and_posted_order(pool4):
    results = pool4.run(check_forward_outputs_and_memory)
    for r in results:  # each stage holds about half the weights, never the whole model
        assert r["held"] < 0.7 * r["full"], results


def check_first_step_leaves_no_graph() -> list[str]:
    """The first step traces the split with a real loss that never runs backward, under the
    activation meter's saved-tensor hooks (memory_report). Nothing of that graph may outlive
    the step: a saved output holding its own grad_fn through the hook would leak it for good."""
    import gc

    def graphs() -> dict[int, str]:
        gc.collect()
        return {id(t): f"{tuple(t.shape)} {type(t.grad_fn).__name__}" for t in gc.get_objects()
                if isinstance(t, torch.Tensor) and t.grad_fn is not None}

    before = graphs()  # what earlier tests of this worker may have left is not this step's
    autopar.init(pp=2, dp=2)
    try:
        engine = autopar.parallelize(_llama(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), num_microbatches=2)
        engine.step(autopar.shard_batch(_padded(0, 8)))
        return [d for i, d in graphs().items() if i not in before]
    finally:
        autopar.destroy()


def test_first_step_leaves_no_autograd_graph_alive(pool4):
    assert pool4.run(check_first_step_leaves_no_graph) == [[]] * 4


# --- like units are traced once ------------------------------------------------------------------
class _Cut(nn.Module):
    """Keeps ``keep[0]`` of its 8 features. A list, so the trace cannot tell a 6 from an 8: blocks
    of both kinds look alike to it, and a reused trace gets the width of the first one."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.keep = [keep]
        self.calls = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(h)[..., :self.keep[0]]


class _Cuts(nn.Module):
    def __init__(self, keeps: tuple[int, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Cut(k) for k in keeps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        h = x
        for block in self.blocks:
            h = block(h)
            h = F.pad(h, (0, 8 - h.shape[-1]))
        return {"loss": F.mse_loss(h, y)}


def test_like_units_are_traced_once_and_unlike_ones_each():
    from autopar.pipeline.trace import Tracer

    torch.manual_seed(0)
    model = _Cuts((8, 8, 8))
    model.blocks[2].lin = nn.Linear(8, 8, bias=False)  # unlike: no bias
    modules = list(model.blocks)
    tracer = Tracer(model, [f"blocks.{i}" for i in range(3)], modules, set(), torch.device("cpu"), count_flops=True)
    h = torch.randn(2, 8, requires_grad=True)  # as the fresh leaves between units are
    with tracer.active():
        for i, block in enumerate(modules):
            h = tracer.call(i, block.forward, (h,), {})
    assert [b.calls for b in modules] == [1, 0, 1]
    assert tracer.flow.flops == [2 * 2 * 8 * 8] * 3  # the reused unit's FLOPs are counted too


def check_wrong_reuse_is_named(every_unit: bool) -> float:
    """blocks.2 (keeps 6) takes the trace of blocks.1 (keeps 8: same input, as blocks.0's is not)
    and is the last of stage 0: what it sends is not what stage 1 expects."""
    import os

    os.environ["AUTOPAR_TRACE_EVERY_UNIT"] = "1" if every_unit else "0"
    try:
        autopar.init(pp=2, timeout=5)  # rank 1 waits for what rank 0 never sends
        torch.manual_seed(0)
        engine = autopar.parallelize(_Cuts((8, 8, 6, 8)), lambda p: torch.optim.SGD(p, lr=0.1), num_microbatches=1,
                                     split_points=["blocks.3"], loss_fn=lambda output, batch: output["loss"])
        g = torch.Generator().manual_seed(0)
        return engine.step({"x": torch.randn(4, 8, generator=g), "y": torch.randn(4, 8, generator=g)})
    finally:
        del os.environ["AUTOPAR_TRACE_EVERY_UNIT"]


def test_a_wrongly_reused_trace_is_a_named_error_and_the_switch_trains(pool2):
    with pytest.raises(AssertionError, match=r"(?s)rank 0.*blocks\.2 returned \(4, 6\) torch.float32 as output 0, "
                                             r"where its trace gave \(4, 8\) torch.float32: "
                                             r".*\(AUTOPAR_TRACE_EVERY_UNIT=1 traces every unit\)"):
        pool2.run(check_wrong_reuse_is_named, False, timeout=120)
    torch.manual_seed(0)
    serial = _Cuts((8, 8, 6, 8))
    g = torch.Generator().manual_seed(0)
    expected = serial(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g))["loss"].item()
    assert pool2.run(check_wrong_reuse_is_named, True) == [pytest.approx(expected, rel=1e-6)] * 2
