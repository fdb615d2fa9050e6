"""The forward of sharded layers: the grid it runs on, and its overlapped all-reduces.

Sharded layers run on the grid they were sharded for, never on whichever one is current. A forward that looked the grid up globally would run a model on a grid it was not cut for
(after ``destroy`` and a new ``init``), and it would make two models on two grids in one
process impossible. These checks take the current grid away and run forward, backward and the
vocabulary-parallel loss; they copy a model and check the copy runs (prefetching included);
after ``destroy`` the model fails with a clear error instead of reaching destroyed groups.

A layer whose output is summed over x or y multiplies in row chunks and launches each chunk's
all-reduce before multiplying the next (``comm._product``). Checked: the order of launches and
waits (what lets NCCL overlap them with the matmul), the same bytes as one all-reduce, and
training equal to serial in float64 and fp32 on batches large enough to be split.
"""
from __future__ import annotations

import copy

import pytest
import torch

import autopar
import intra_layer_models as models
from autopar.intra_layer import comm, vocab_parallel_cross_entropy
from autopar.runtime import state


def _build(name: str, parallel: bool = True, dtype: torch.dtype = torch.float32, **options: int) -> torch.nn.Module:
    torch.manual_seed(1)
    if not parallel:
        return models.BUILDERS[name]().to(dtype)
    with autopar.auto_parallelize(**options):
        return models.BUILDERS[name]().to(dtype)


def runs_without_current_grid(name: str) -> None:
    autopar.init(x=2, y=2, z=2)
    model = _build(name)
    model.train()
    data = autopar.shard_batch(models.batch(name))
    first = model(**data).loss  # the first forward also chains layers (autochain)
    first.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    twin = copy.deepcopy(model)
    grid, state._grid = state._grid, None
    try:
        loss = model(**data).loss
        loss.backward()
        twin_loss = twin(**data).loss
        twin_loss.backward()
        with torch.no_grad():  # the copy recorded its own layer order above: now it prefetches
            twin(**data)
        head, labels = model.get_output_embeddings(), data["labels"]
        hidden = model.transformer(data["input_ids"]).last_hidden_state
        full = torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1), labels.flatten())
        head.out_sharded = True  # as the Engine sets it for its loss on shards
        sharded = vocab_parallel_cross_entropy(head(hidden), labels, head)
        head.out_sharded = False
    finally:
        state._grid = grid
    torch.testing.assert_close(sharded, full)
    assert loss.item() == first.item() == twin_loss.item()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, grads[n]) and torch.equal(q.grad, grads[n]), n
        assert vars(q).keys() == vars(p).keys(), f"{n}: the copy lost {vars(p).keys() - vars(q).keys()}"
    assert twin.transformer.h[0].mlp.c_fc.prefetcher.hits > 0, "the copy's prefetcher does not prefetch"
    del grid, first, loss, twin_loss, hidden, full, sharded  # their autograd graphs hold the grid
    autopar.destroy()
    with pytest.raises(RuntimeError, match="sharded for a grid that is gone"):
        model(**data)


def test_forward_runs_on_the_bound_grid(pool8):
    pool8.run(runs_without_current_grid, "gpt2")


def test_overlap_bounds_cover_every_row_once():
    for rows, chunks, sizes in [(0, 2, [0]), (127, 2, [127]), (128, 2, [64, 64]), (141, 2, [71, 70]),
                                (200, 4, [67, 67, 66]), (1000, 4, [250] * 4), (1000, 1, [1000])]:
        bounds = comm.overlap_bounds(rows, chunks)
        assert [b - a for a, b in bounds] == sizes, (rows, chunks, bounds)
        assert bounds[0][0] == 0 and bounds[-1][1] == rows and all(p[1] == q[0] for p, q in zip(bounds, bounds[1:]))


def _recorded(events: list[str]):
    """``comm._all_reduce`` that logs each launch and each wait of an asynchronous one."""
    real = comm._all_reduce

    class Work:
        def __init__(self, work):
            self.work = work

        def wait(self):
            events.append("wait")
            return self.work.wait()

    def all_reduce(t, grid, axis, async_op=False):
        events.append("async" if async_op else "sync")
        work = real(t, grid, axis, async_op)
        return Work(work) if async_op else work

    return all_reduce


def _lm_loss(output: object, batch: dict) -> torch.Tensor:
    """The causal LM loss in the logits' dtype (HF's own rounds float64 logits to fp32)."""
    logits = output.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, eps=1e-5)


def _serial_steps(model: torch.nn.Module, data: dict, steps: int) -> list[float]:
    opt, losses = _adamw(model.parameters()), []
    for _ in range(steps):
        loss = _lm_loss(model(**data), data)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _in_place_after_split(dtype: torch.dtype) -> None:
    """A bias-free layer's split product may be changed in place, as the unsplit one may
    (``relu_``, ``*=`` after a gate: the chains allow them). On y = 1 it reaches the caller as
    the product itself."""
    outs = []
    for chunks in (1, 2):
        torch.manual_seed(3)
        with autopar.auto_parallelize(overlap_chunks=chunks):
            layer = torch.nn.Linear(16, 32, bias=False).to(dtype)
        x = torch.randn(3, 47, 16, dtype=dtype, requires_grad=True)  # 141 rows: chunks of 71 and 70
        out = layer(x)
        out.relu_()
        out.sum().backward()
        outs.append((out.detach(), x.grad))
    torch.testing.assert_close(outs[0], outs[1])


def overlapped_all_reduce(name: str, sizes: tuple[int, int, int]) -> dict:
    x, y, z = sizes
    grid = autopar.init(x=x, y=y, z=z)
    # 128 rows (4 x 32 tokens) per batch slice: two chunks of comm.OVERLAP_MIN_ROWS
    data = models.batch(name, n=4 * grid.batch_shards, seq=32)
    out = {}
    for dtype in (torch.float64, torch.float32):
        ser = _build(name, parallel=False, dtype=dtype)
        ref = _serial_steps(ser, data, 2)
        runs = {}
        for chunks in (1, 2):
            model = _build(name, dtype=dtype, overlap_chunks=chunks, chain=False)
            events: list[str] = []
            comm.COUNTER.enabled, comm.COUNTER.bytes = True, {}
            real, comm._all_reduce = comm._all_reduce, _recorded(events)
            try:
                engine = autopar.parallelize(model, _adamw, loss_fn=_lm_loss)
                losses = [engine.step(autopar.shard_batch(data)) for _ in range(2)]
            finally:
                comm._all_reduce, comm.COUNTER.enabled = real, False
            runs[chunks] = (losses, events, dict(comm.COUNTER.bytes), autopar.full_state_dict(model))
        tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {}
        for chunks, (losses, _, _, weights) in runs.items():
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), **tol)
            for k, v in ser.state_dict().items():
                torch.testing.assert_close(weights[k], v, **tol, msg=lambda m, k=k: f"chunks={chunks} {k}: {m}")
        assert runs[1][2] == runs[2][2], "splitting an all-reduce must not change the bytes it moves"
        _in_place_after_split(dtype)
        out[str(dtype)] = {c: "".join({"async": "a", "wait": "w", "sync": "s"}[e] for e in ev)
                           for c, (_, ev, _, _) in runs.items()}
    return out


@pytest.mark.parametrize("name, sizes", [("gpt2", (2, 2, 2)), ("llama", (2, 1, 1))])
def test_forward_all_reduces_overlap_the_next_chunk(pool8, name, sizes):
    for per_dtype in pool8.run(overlapped_all_reduce, name, sizes):
        for order in per_dtype.values():
            # One piece: each forward sum is one blocking all-reduce, and backward's input-gradient
            # all-reduces are launched before the weight-gradient matmul and waited after it.
            assert "s" in order[1] and "aa" not in order[1]
            # Two chunks: both halves of a forward sum are in flight before the first wait.
            assert "aaww" in order[2], order[2]
            assert order[2].count("s") < order[1].count("s")
