"""Gradient buckets, overlap, no_sync and ZeRO-1/2 against a serial run, on 4 gloo ranks.

Buckets are made tiny (``bucket_mb`` of 64 floats) so every model has several, and
every check compares to a serial AdamW run of the same global batch in fp32.
"""
import pytest
import torch
import torch.distributed as dist

import autopar
from serial import train_serial
from autopar.data_parallel import GradBuckets
from autopar.data_parallel.buckets import ZERO2_IN_FLIGHT
from autopar.runtime.params import grad_axes, set_grad_axes

TINY_BUCKET_MB = 1 / 4096  # 256 bytes: 64 fp32 values
GRIDS = [dict(dp=4), dict(dp=2, z=2), dict(dp=2, x=2)]


class MLP(torch.nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.LayerNorm(32),
                                       torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
        self.spare = torch.nn.Linear(4, 4) if unused else None  # never called

    def forward(self, x):
        return self.net(x)


def _mse(out, batch):
    return torch.nn.functional.mse_loss(out, batch[1])


def _batches(steps, n=16):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)) for _ in range(steps)]


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _serial(steps, clip, unused=False):
    torch.manual_seed(0)
    losses, state, opt = train_serial(MLP(unused), _batches(steps), _adamw, _mse, clip)
    return losses, state, sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim())


def _train(microbatches, zero, clip, unused=False):
    torch.manual_seed(0)
    engine = autopar.parallelize(MLP(unused), optimizer=_adamw, num_microbatches=microbatches, loss_fn=_mse,
                                 clip_grad_norm=clip, bucket_mb=TINY_BUCKET_MB, zero=zero)
    losses = [engine.step(autopar.shard_batch(b)) for b in _batches(3)]
    return engine, losses


def _assert_equals_serial(engine, losses, ref_losses, ref_state):
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    full = autopar.full_state_dict(engine)
    assert full.keys() == ref_state.keys()
    for k in full:
        torch.testing.assert_close(full[k], ref_state[k], rtol=1e-5, atol=1e-6, msg=k)


def _zero2_buffers_alive(engine) -> int:
    """One more step, counting the full gradient buffers alive whenever one is made; afterwards
    no full gradient is left, only the optimizer's shards."""
    alive, fill = [], engine.dp._fill

    def counting(bucket):
        fill(bucket)
        alive.append(sum(b.grad is not None for b in engine.dp.buckets))

    engine.dp._fill = counting
    engine.step(autopar.shard_batch(_batches(1)[0]))
    assert all(b.grad is None for b in engine.dp.buckets) and all(p.grad is None for p in engine.params)
    assert len(alive) == len(engine.dp.buckets)
    return max(alive)


def check_grid_equals_serial(grid_kwargs):
    """Every (microbatches, zero, clip) combination on one grid, against serial."""
    grid = autopar.init(**grid_kwargs)
    results = []
    for clip in (None, 0.05):
        ref_losses, ref_state, ref_state_numel = _serial(3, clip)
        for microbatches in (1, 4):
            for zero in (0, 1, 2):
                engine, losses = _train(microbatches, zero, clip)
                assert len(engine.dp.buckets) >= 4, "buckets must be small enough to be several"
                _assert_equals_serial(engine, losses, ref_losses, ref_state)
                state_numel = sum(t.numel() for s in engine.optimizer.state.values() for t in s.values() if t.dim())
                if zero:
                    n = grid.size("dp", "z")
                    padded = sum(b.numel for b in engine.dp.buckets)
                    assert state_numel * n == 2 * padded, (state_numel, padded, n)
                    assert padded - ref_state_numel // 2 < n * len(engine.dp.buckets)  # padding only
                    # memory_report shows what the rank holds, not the optimizer's flat shards
                    report = autopar.memory_report(engine).on_device
                    assert report["parameters"] == 4 * ref_state_numel // 2
                    if zero == 1:
                        assert report["gradients"] == 4 * padded
                    else:
                        assert report["gradients"] >= 4 * padded // n
                        assert _zero2_buffers_alive(engine) <= ZERO2_IN_FLIGHT + 1
                else:
                    assert state_numel == ref_state_numel
                results.append((clip, microbatches, zero, losses))
    return results


@pytest.mark.parametrize("grid_kwargs", GRIDS, ids=lambda g: "x".join(f"{k}{v}" for k, v in g.items()))
def test_buckets_and_zero_equal_serial(pool4, grid_kwargs):
    per_rank = pool4.run(check_grid_equals_serial, grid_kwargs)
    assert all(r == per_rank[0] for r in per_rank), "losses must be identical on every rank"


def check_accumulation_across_steps(grid_kwargs):
    """k step calls, all but the last inside no_sync(), equal one serial step on the k batches
    put together; nothing is reduced and no weight moves while accumulating."""
    autopar.init(**grid_kwargs)
    batches = _batches(6, n=8)
    merged = [tuple(torch.cat(parts) for parts in zip(*batches[i:i + 3])) for i in (0, 3)]
    torch.manual_seed(0)
    model = MLP()
    opt = _adamw(model.parameters())
    ref_losses = []
    for x, y in merged:
        loss = _mse(model(x), (x, y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    for zero in (0, 2):
        torch.manual_seed(0)
        engine = autopar.parallelize(MLP(), optimizer=_adamw, num_microbatches=2, loss_fn=_mse, clip_grad_norm=0.05,
                                     bucket_mb=TINY_BUCKET_MB, zero=zero)
        losses = []
        for i in (0, 3):
            before = {k: v.clone() for k, v in engine.model.state_dict().items()}
            with engine.no_sync():
                parts = [engine.step(autopar.shard_batch(b)) for b in batches[i:i + 2]]
            assert all(torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())
            parts.append(engine.step(autopar.shard_batch(batches[i + 2])))
            losses.append(sum(parts) / 3)
        _assert_equals_serial(engine, losses, ref_losses, model.state_dict())


@pytest.mark.parametrize("grid_kwargs", [dict(dp=4), dict(dp=2, z=2)], ids=["dp4", "dp2xz2"])
def test_accumulation_across_steps_equals_large_batch(pool4, grid_kwargs):
    pool4.run(check_accumulation_across_steps, grid_kwargs)


def check_overlap(microbatches):
    """Record the order of collectives and of the input layer's gradient (one of the last that
    backward produces): a bucket must be launched before it, and only in the last microbatch."""
    autopar.init(dp=4)
    torch.manual_seed(0)
    engine = autopar.parallelize(MLP(), optimizer=_adamw, num_microbatches=microbatches, loss_fn=_mse,
                                 bucket_mb=TINY_BUCKET_MB)
    events = []
    engine.model.net[0].weight.register_post_accumulate_grad_hook(lambda p: events.append("input-grad"))
    real = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        events.append("all_reduce")
        return real(tensor, *args, **kwargs)

    first, second = _batches(2)
    engine.step(autopar.shard_batch(first))  # the first step also looks for unused parameters
    events.clear()
    dist.all_reduce = recording
    try:
        engine.step(autopar.shard_batch(second))
    finally:
        dist.all_reduce = real
    return events, len(engine.dp.buckets)


@pytest.mark.parametrize("microbatches", [1, 4])
def test_first_bucket_is_reduced_while_backward_runs(pool4, microbatches):
    events, buckets = pool4.run(check_overlap, microbatches)[0]
    ends = [i for i, e in enumerate(events) if e == "input-grad"]  # end of each backward
    assert len(ends) == microbatches
    last_starts = ends[-2] + 1 if microbatches > 1 else 0
    assert "all_reduce" not in events[:last_starts], "no reduction while accumulating"
    assert events[last_starts:ends[-1]].count("all_reduce") >= 1, events
    # one all-reduce per bucket, plus the loss afterwards
    assert events.count("all_reduce") == buckets + 1


class RegisteredBackwards(torch.nn.Module):
    """Modules registered in the opposite order to the one they run in: reverse registration
    order puts the input layer's gradient, one of the last to be ready, in the first bucket."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(32, 4)
        self.mid = torch.nn.Linear(32, 32)
        self.inp = torch.nn.Linear(8, 32)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def check_rebuild_in_arrival_order():
    autopar.init(dp=4)
    torch.manual_seed(0)
    engine = autopar.parallelize(RegisteredBackwards(), optimizer=_adamw, loss_fn=_mse, bucket_mb=TINY_BUCKET_MB)
    model = engine.model
    inp = {id(model.inp.weight), id(model.inp.bias)}
    assert any(id(p) in inp for p in engine.dp.buckets[0].params)
    first, second = _batches(2)
    engine.step(autopar.shard_batch(first))
    assert not any(id(p) in inp for p in engine.dp.buckets[0].params)
    assert any(p is model.head.weight or p is model.head.bias for p in engine.dp.buckets[0].params)
    events = []
    model.inp.weight.register_post_accumulate_grad_hook(lambda p: events.append("input-grad"))
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (events.append("all_reduce"), real(*a, **k))[1]
    try:
        engine.step(autopar.shard_batch(second))
    finally:
        dist.all_reduce = real
    assert events.index("all_reduce") < events.index("input-grad"), events
    return [tuple(p.shape) for p in engine.dp.buckets[0].params]


def test_buckets_follow_the_real_gradient_order(pool4):
    layouts = pool4.run(check_rebuild_in_arrival_order)
    assert all(layout == layouts[0] for layout in layouts)


def check_reduce_matches_plain(grid_kwargs):
    """The bucketed reduction, with no_sync accumulation and a mix of grad_axes, equals one
    all-reduce per tensor over its grad_axes after backward. Over 2 ranks a sum has one order, so
    the match is bitwise; over more, gloo's ring adds each element in an order that depends on
    where it sits in the buffer, so the match is to fp32 summation order."""
    grid = autopar.init(**grid_kwargs)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(MLP())
        for p in models[-1].net[3].parameters():
            set_grad_axes(p, ("dp",))  # as a depth-sharded layer would: a second bucket class
    buckets = GradBuckets(list(models[0].parameters()), grid, bucket_mb=TINY_BUCKET_MB, zero=0)
    assert {b.axes for b in buckets.buckets} == {("dp",), ("dp", "z")} if grid.sizes["z"] > 1 else {("dp", "z")}
    g = torch.Generator().manual_seed(grid.rank)
    data = [(torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)) for _ in range(3)]
    with buckets.no_sync():
        for x, y in data[:2]:
            _mse(models[0](x), (x, y)).backward()
    for x, y in data[2:]:
        _mse(models[0](x), (x, y)).backward()
    buckets.finish()
    for x, y in data:
        _mse(models[1](x), (x, y)).backward()
    for q in models[1].parameters():
        dist.all_reduce(q.grad, group=grid.group(*grad_axes(q)))
    for bucket in buckets.buckets:
        for p in bucket.params:
            q = dict(zip(map(id, models[0].parameters()), models[1].parameters()))[id(p)]
            if bucket.world == 2:
                assert torch.equal(p.grad, q.grad)
            else:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    buckets.after_step()
    assert all(torch.count_nonzero(p.grad) == 0 for p in models[0].parameters())


@pytest.mark.parametrize("grid_kwargs", [dict(dp=4), dict(dp=2, z=2), dict(dp=2, x=2)], ids=["dp4", "dp2xz2", "dp2xx2"])
def test_reduction_matches_a_plain_all_reduce(pool4, grid_kwargs):
    pool4.run(check_reduce_matches_plain, grid_kwargs)


def check_unused(zero):
    autopar.init(dp=4)
    try:
        engine, losses = _train(2, zero, None, unused=True)
    except ValueError as e:
        return str(e)
    ref_losses, ref_state, _ = _serial(3, None, unused=True)
    _assert_equals_serial(engine, losses, ref_losses, ref_state)  # weight decay would move it
    return None


def test_unused_parameters_get_no_gradient(pool4):
    assert pool4.run(check_unused, 0) == [None] * 4
    for message in pool4.run(check_unused, 1):
        assert "got no gradient on any rank" in message


def check_rejects_non_elementwise():
    autopar.init(dp=4)
    with pytest.raises(ValueError, match="elementwise"):
        autopar.parallelize(MLP(), optimizer=lambda p: torch.optim.Adafactor(p), loss_fn=_mse, zero=1)
    with pytest.raises(ValueError, match="zero must be one of"):
        autopar.parallelize(MLP(), optimizer=_adamw, loss_fn=_mse, zero=3)
    with pytest.raises(ValueError, match="bucket_mb must be a positive"):
        autopar.parallelize(MLP(), optimizer=_adamw, loss_fn=_mse, bucket_mb=0)


def test_zero_rejects_non_elementwise_optimizer(pool4):
    pool4.run(check_rejects_non_elementwise)


def check_zero_on_torch_before_2_13():
    """zero=1/2 on a torch without ``all_gather_single`` / ``reduce_scatter_single`` (new in 2.13;
    autopar declares torch>=2.4): those names are removed from torch.distributed and the helpers
    rebound to the older spellings, as ``runtime.collectives`` binds them there."""
    import autopar.data_parallel.comm as dp_comm

    autopar.init(dp=4)
    removed = {n: getattr(dist, n) for n in ("all_gather_single", "reduce_scatter_single") if hasattr(dist, n)}
    bound = dp_comm.all_gather_flat, dp_comm.reduce_scatter_flat
    for name in removed:
        delattr(dist, name)
    dp_comm.all_gather_flat, dp_comm.reduce_scatter_flat = dist.all_gather_into_tensor, dist.reduce_scatter_tensor
    try:
        ref_losses, ref_state, _ = _serial(3, None)
        for zero in (1, 2):
            engine, losses = _train(2, zero, None)
            _assert_equals_serial(engine, losses, ref_losses, ref_state)
    finally:
        for name, fn in removed.items():
            setattr(dist, name, fn)
        dp_comm.all_gather_flat, dp_comm.reduce_scatter_flat = bound


def test_zero_runs_on_torch_before_2_13(pool4):
    pool4.run(check_zero_on_torch_before_2_13)
