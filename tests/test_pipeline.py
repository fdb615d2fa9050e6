"""Pipeline parallelism equals serial training: losses and weights after 3 optimizer steps, for
tiny HF models (GPT-2 with tied embeddings, Llama, OPT, BERT, ViT) and a model with a long skip
connection, under every schedule, on pp=2, pp=4 and pp=2 x dp=2 gloo grids. Plus the pieces
on their own (partition, schedules, the zero-bubble backward split) and every bad input."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import nn

import autopar
from autopar.pipeline import SCHEDULES, build_schedule, partition
from autopar.pipeline.zero_bubble import backward_input, backward_weight
from mp import GROUP_THREADS, thread_count
from pipeline_models import batch, build
from serial import hf_call, output_loss, train_serial

GLOBAL_BATCH = 8


def _optimizer(kind: str):
    # eps=1e-6: attention key biases get an exactly-zero gradient, i.e. rounding noise that
    # Adam's default eps=1e-8 would blow up to full-size steps of arbitrary sign.
    if kind == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-6)
    return lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _loss_fn(name: str):
    return (lambda out, b: out["loss"]) if name == "skip" else None


@functools.lru_cache(maxsize=None)
def _serial(name: str, layers: int, opt: str, steps: int, clip: float | None):
    """Cached: the pool's ranks live for the session, and the schedules of one model share it."""
    batches = [batch(name, GLOBAL_BATCH, seed=s + 1) for s in range(steps)]
    return train_serial(build(name, layers), batches, _optimizer(opt), output_loss, clip, call=hf_call)[:2]


def check_against_serial(name: str, schedule: str, pp: int, m: int, *, v: int = 1, layers: int = 4,
                         opt: str = "adamw", clip: float | None = None, steps: int = 3, **options) -> dict:
    """Runs on every rank: train on the grid, gather the full weights, compare with a serial
    run of the same model on the same global batches."""
    autopar.init(pp=pp)
    engine = autopar.parallelize(build(name, layers), optimizer=_optimizer(opt), num_microbatches=m,
                                 schedule=schedule, virtual_stages=v, loss_fn=_loss_fn(name),
                                 clip_grad_norm=clip, **options)
    losses = [engine.step(autopar.shard_batch(batch(name, GLOBAL_BATCH, seed=s + 1))) for s in range(steps)]
    full = autopar.full_state_dict(engine)
    info = {"bounds": engine.pipeline.bounds, "costs": engine.pipeline.costs}
    autopar.destroy()
    ref_losses, ref = _serial(name, layers, opt, steps, clip)
    case = f"{name} {schedule} pp={pp} M={m} v={v} {opt}"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5,
                               msg=lambda s: f"{case}: losses {losses} vs serial {ref_losses}\n{s}")
    assert list(full) == list(ref), f"{case}: names differ"
    for key in ref:
        torch.testing.assert_close(full[key], ref[key], rtol=1e-5, atol=1e-5, msg=lambda s: f"{case}: {key}\n{s}")
    return info


def run_cases(cases: list[tuple]) -> list[dict]:
    return [check_against_serial(*args, **kwargs) for args, kwargs in cases]


def _v(schedule: str) -> int:
    return 2 if schedule == "interleaved" else 1


# -- single process ---------------------------------------------------------------------------

def test_partition_is_optimal():
    g = torch.Generator().manual_seed(0)
    for n, parts in [(5, 2), (7, 3), (9, 4), (6, 6)]:
        costs = (torch.rand(n, generator=g) * 10).tolist()
        bounds = partition(costs, parts)
        got = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = min(max(sum(costs[a:b]) for a, b in zip((0, *cut), (*cut, n)))
                   for cut in itertools.combinations(range(1, n), parts - 1))
        assert got == pytest.approx(best) and len(bounds) == parts + 1


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("pp,m", [(2, 2), (2, 8), (4, 4), (4, 8)])
def test_schedules_cover_every_microbatch_once(schedule, pp, m):
    v = _v(schedule)
    kinds = "FBW" if schedule == "zerobubble" else "FB"
    for rank in range(pp):
        actions = build_schedule(schedule, pp, rank, m, v)
        chunks = range(rank, pp * v, pp)
        assert sorted(actions) == sorted((k, c, i) for k in kinds for c in chunks for i in range(m))
        for a in actions:  # a backward never precedes its forward, a W never its B
            prior = actions[:actions.index(a)]
            assert a.kind == "F" or (("F" if a.kind == "B" else "B"), a.chunk, a.mb) in prior


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_messages_between_two_ranks_come_in_the_same_order(schedule):
    """Each rank sends and receives in its own action order; NCCL matches point-to-point
    messages by order (it ignores tags), so both ends of every rank pair must agree."""
    for pp, m in itertools.product((2, 3, 4), (1, 2, 4, 8, 12)):
        for v in ((2, 3) if schedule == "interleaved" else (1,)):
            if schedule == "interleaved" and m % pp:
                continue
            sent: dict[tuple, list] = {}
            received: dict[tuple, list] = {}
            for r in range(pp):
                for kind, c, mb in build_schedule(schedule, pp, r, m, v):
                    if kind == "F" and c > 0:
                        received.setdefault(((c - 1) % pp, r), []).append(("act", c, mb))
                    if kind == "F" and c < pp * v - 1:
                        sent.setdefault((r, (c + 1) % pp), []).append(("act", c + 1, mb))
                    if kind == "B" and c < pp * v - 1:
                        received.setdefault(((c + 1) % pp, r), []).append(("grad", c + 1, mb))
                    if kind == "B" and c > 0:
                        sent.setdefault((r, (c - 1) % pp), []).append(("grad", c, mb))
            assert sent == received, (pp, m, v)


class SharedWeightPaths(nn.Module):
    """One weight-only node (w * 2) reached from two matmuls, one of them also through the
    other: replaying the outer matmul must not run the inner one again."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(5, 5)), nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ws = self.w * 2
        y = x @ ws + self.b
        return torch.tanh(y) @ ws + self.b * y


@pytest.mark.parametrize("net", ["mlp", "shared"])
def test_zero_bubble_split_equals_full_backward(net):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.LayerNorm(7), nn.Linear(7, 5)) if net == "mlp" \
        else SharedWeightPaths()
    x = torch.randn(4, 5, requires_grad=True)
    grad_out = torch.randn(4, 5)
    net(x).backward(grad_out)
    ref_x, ref = x.grad.clone(), [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    params = list(net.parameters())
    (gx,), deferred = backward_input([net(x)], [grad_out], [x], params)
    assert all(p.grad is None for p in params), "B must not compute weight gradients"
    torch.testing.assert_close(gx, ref_x)
    backward_weight(deferred)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r)


# -- pp = 2 -----------------------------------------------------------------------------------

def test_pp2_every_model_every_schedule(pool2):
    # whisper: encoder-decoder, both stacks split; the encoder output crosses every boundary.
    cases = [((name, schedule, 2, 4), {"v": _v(schedule)})
             for name in ("gpt2", "llama", "opt", "bert", "vit", "whisper", "skip") for schedule in SCHEDULES]
    pool2.run(run_cases, cases)


def test_pp2_microbatch_counts_sgd(pool2):
    cases = [(("gpt2", schedule, 2, m), {"v": _v(schedule), "opt": "sgd"})
             for schedule in SCHEDULES for m in (1, 2, 8) if not (schedule == "interleaved" and m == 1)]
    pool2.run(run_cases, cases)


def test_pp2_checkpointing_split_points_clipping(pool2):
    cases = [(("gpt2", "1f1b", 2, 4), {"recompute": True}),
             (("bert", "interleaved", 2, 2), {"v": 2, "recompute": [0]}),
             (("llama", "gpipe", 2, 2), {"recompute": [1], "clip": 0.05}),
             (("gpt2", "zerobubble", 2, 4), {"clip": 0.05}),
             (("gpt2", "1f1b", 2, 2), {"split_points": ["transformer.h.3"]}),
             (("skip", "1f1b", 2, 4), {"split_points": ["blocks.1"], "opt": "sgd"})]
    infos = pool2.run(run_cases, cases)[0]
    assert infos[4]["bounds"][1] == 5  # wte, wpe, h.0, h.1, h.2 | h.3, ...: the user's cut


def _tied_and_balanced() -> tuple:
    autopar.init(pp=2)
    engine = autopar.parallelize(build("gpt2", 4), optimizer=_optimizer("adamw"), num_microbatches=2)
    for s in range(2):
        engine.step(autopar.shard_batch(batch("gpt2", GLOBAL_BATCH, seed=s + 1)))
    full = autopar.full_state_dict(engine)
    torch.testing.assert_close(full["transformer.wte.weight"], full["lm_head.weight"], rtol=0, atol=0)
    model = engine.model
    owned = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return engine.pipeline.bounds, engine.pipeline.costs, sorted(owned)


def test_pp2_tied_embedding_identical_and_split_balanced(pool2):
    (bounds, costs, owned0), (_, _, owned1) = pool2.run(_tied_and_balanced)
    assert "transformer.wte.weight" in owned0 and "lm_head.weight" in owned1
    assert "lm_head.weight" not in owned0 and "transformer.wte.weight" not in owned1
    assert not {n for n in owned0 if ".h." in n} & {n for n in owned1 if ".h." in n}
    stage = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert max(stage) == pytest.approx(min(max(sum(costs[:k]), sum(costs[k:])) for k in range(1, len(costs))))
    assert len(bounds) == 3 and bounds[1] == 4  # wte, wpe, h.0, h.1 | h.2, h.3, ln_f, lm_head


class UsesWeightInGlue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](self.blocks[0](x)) @ self.head.weight  # head never called


class CallsBlockTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.blocks[0], self.blocks[1], self.blocks[0], self.blocks[2]):
            x = block(x)
        return x


def _expect_error(make, message: str) -> str:
    try:
        make()
    except (ValueError, RuntimeError) as e:
        assert message in str(e), f"expected {message!r} in: {e}"
        return type(e).__name__
    raise AssertionError(f"no error; expected {message!r}")


def _bad_inputs() -> list[str]:
    autopar.init(pp=2)
    opt = _optimizer("sgd")
    mse = lambda out, b: out.pow(2).mean()  # noqa: E731
    kinds = [
        _expect_error(lambda: autopar.parallelize(build("gpt2", 1), opt, 2),
                      "has only 1 layers; use pp*virtual_stages <= 1, or name where stages 1.. start with "),
        _expect_error(lambda: autopar.parallelize(build("gpt2", 4), opt, 2, schedule="zigzag"),
                      "unknown schedule 'zigzag'"),
        _expect_error(lambda: autopar.parallelize(build("gpt2", 6), opt, 2, schedule="interleaved",
                                                  virtual_stages=2), "do not split into pp*virtual_stages"),
        _expect_error(lambda: autopar.parallelize(build("gpt2", 4), opt, 2, virtual_stages=2),
                      "needs schedule='interleaved'"),
        _expect_error(lambda: autopar.parallelize(nn.Linear(4, 4), opt, 2), "split_points=["),
        _expect_error(lambda: autopar.parallelize(build("gpt2", 4), opt, 2, split_points=["nope"]),
                      "not submodules"),
        _expect_error(lambda: autopar.parallelize(build("gpt2", 4), opt, 2, schedule="zerobubble",
                                                  recompute=True), "not supported with"),
    ]
    engine = autopar.parallelize(build("gpt2", 4), opt, num_microbatches=3)
    kinds.append(_expect_error(lambda: engine.step(batch("gpt2", 4)), "does not divide into 3 microbatches"))
    twice = autopar.parallelize(CallsBlockTwice(), opt, 2, loss_fn=mse)
    kinds.append(_expect_error(lambda: twice.step(torch.randn(4, 4)), "'blocks.0' is called twice"))
    glue = autopar.parallelize(UsesWeightInGlue(), opt, 2, loss_fn=mse)
    kinds.append(_expect_error(lambda: glue.step(torch.randn(4, 4)), "uses parameter 'head.weight' directly"))
    # Errors leave no collective half-done: a good engine still trains afterwards.
    good = autopar.parallelize(build("gpt2", 4), opt, num_microbatches=2)
    good.step(batch("gpt2", 4))
    return kinds


def test_bad_inputs_raise_on_every_rank(pool2):
    results = pool2.run(_bad_inputs)
    assert results[0] == results[1] and len(results[0]) == 10


# -- four ranks -------------------------------------------------------------------------------

def test_pp4_every_schedule(pool4):
    cases = [(("gpt2", schedule, 4, m), {"v": _v(schedule), "layers": 8, "opt": opt})
             for schedule in SCHEDULES for m, opt in ((4, "adamw"), (8, "sgd"))]
    pool4.run(run_cases, cases)


def test_pp2_dp2_every_schedule(pool4):
    cases = [((name, schedule, 2, 2), {"v": _v(schedule), "clip": 0.05 if name == "gpt2" else None})
             for name in ("gpt2", "llama", "skip") for schedule in SCHEDULES]
    pool4.run(run_cases, cases)


def _with_tensor_parallel(name: str, schedule: str, x: int, y: int) -> None:
    """Tensor-parallel layers (built under auto_parallelize) inside the stages: the pipeline
    only moves modules, so they keep their sharded weights and paired collectives. After
    ``destroy`` no group is left alive (the stage trace once pinned every tensor-parallel group
    through FakeTensorMode's dispatch cache)."""
    opt = _optimizer("sgd")
    threads = thread_count()
    autopar.init(pp=2, x=x, y=y)
    with autopar.auto_parallelize():
        model = build(name, 4)
    engine = autopar.parallelize(model, optimizer=opt, num_microbatches=2, schedule=schedule)
    losses = [engine.step(autopar.shard_batch(batch(name, GLOBAL_BATCH, seed=s + 1))) for s in range(3)]
    full = autopar.full_state_dict(engine)
    del engine, model
    autopar.destroy()
    leaked = thread_count() - threads
    assert leaked < GROUP_THREADS, f"{leaked} more threads after destroy(): a process group is still alive"
    ref_losses, ref = _serial(name, 4, "sgd", 3, None)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    assert set(full) == set(ref)
    for key in ref:
        torch.testing.assert_close(full[key], ref[key], rtol=1e-5, atol=1e-5, msg=lambda s: f"{key}\n{s}")


def test_pp2_with_tensor_parallel_stages(pool4):
    pool4.run(_with_tensor_parallel, "gpt2", "1f1b", 2, 1)
    pool4.run(_with_tensor_parallel, "llama", "zerobubble", 1, 2)
