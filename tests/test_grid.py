"""Grid layout, group membership, shard_batch, and a data-parallel step equal to serial."""
import pytest
import torch
import torch.distributed as dist

import autopar
from serial import train_serial
from autopar.runtime.grid import AXES, coords_of, group_ranks, rank_of, resolve_sizes

GRIDS_8 = [dict(x=2, y=2, z=2), dict(pp=2, dp=2, x=2), dict(pp=2, y=2, z=2), dict(dp=8),
           dict(pp=4, x=2), dict(dp=2, x=2, z=2)]


def _expected_members(sizes, rank, axes):
    """Brute force: ranks whose coordinates agree with ``rank`` outside ``axes``."""
    me = coords_of(rank, sizes)
    return tuple(r for r in range(8)
                 if all(coords_of(r, sizes)[a] == me[a] for a in AXES if a not in axes))


def check_groups(kwargs):
    grid = autopar.init(**kwargs)
    sizes = grid.sizes
    assert grid.world_size == 8 and rank_of(grid.coords, sizes) == grid.rank
    for axes in [("x",), ("y",), ("z",), ("dp",), ("pp",), ("z", "y", "x"), ("dp", "z"), ("pp", "dp", "z", "y", "x")]:
        members = _expected_members(sizes, grid.rank, axes)
        assert grid.ranks(*axes) == members
        group = grid.group(*axes)
        assert dist.get_process_group_ranks(group) == list(members)
        assert dist.get_rank(group) == grid.index(*axes) == members.index(grid.rank)
        # the group really works: sum of global ranks over the group
        t = torch.tensor([float(grid.rank)])
        dist.all_reduce(t, group=group)
        assert t.item() == sum(members)
    return grid.coords


def test_group_membership_8_ranks(pool8):
    for kwargs in GRIDS_8:
        coords = pool8.run(check_groups, kwargs)
        sizes = resolve_sizes(8, **kwargs)
        # x is innermost, pp outermost: rank r's coordinates are r's mixed-radix digits
        assert [rank_of(c, sizes) for c in coords] == list(range(8))
        assert len({tuple(c.values()) for c in coords}) == 8


def test_order_is_documented_mixed_radix():
    sizes = resolve_sizes(8, pp=2, dp=2, x=2)
    assert coords_of(1, sizes)["x"] == 1 and coords_of(2, sizes)["dp"] == 1 and coords_of(4, sizes)["pp"] == 1
    assert group_ranks(("pp",), 0, sizes) == (0, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=3), "not divisible by pp\\*x\\*y\\*z = 3"),
    (dict(dp=2, x=2), "has 4 ranks but the world has 8"),
    (dict(x=0), "must be a positive integer"),
    (dict(pp=2, dp=2, x=2, z=2), "has 16 ranks"),
])
def test_bad_grids_raise_on_every_rank(pool8, kwargs, match):
    messages = pool8.run(_init_error, kwargs)
    for m in messages:
        assert m is not None
        import re
        assert re.search(match, m), m


def _init_error(kwargs):
    try:
        autopar.init(**kwargs)
    except ValueError as e:
        return str(e)
    return None


def check_shard_batch():
    grid = autopar.init(pp=2, dp=2, z=2)
    batch = {"input_ids": torch.arange(16).view(8, 2), "labels": torch.arange(8), "flag": True}
    mine = autopar.shard_batch(batch)
    assert mine["flag"] is True
    idx = grid.index("dp", "z")
    assert torch.equal(mine["labels"], torch.arange(8)[idx * 2:(idx + 1) * 2])
    tup = autopar.shard_batch((torch.ones(8, 3), torch.zeros(8)))
    assert isinstance(tup, tuple) and tup[0].shape == (2, 3)
    with pytest.raises(ValueError, match="does not divide into 4 data shards"):
        autopar.shard_batch(torch.ones(6, 2))
    return grid.coords["pp"], mine["labels"].tolist()


def test_shard_batch(pool8):
    results = pool8.run(check_shard_batch)
    # the two pipeline stages of each replica see the same samples
    by_rank = dict(enumerate(results))
    for r in range(4):
        assert by_rank[r][1] == by_rank[r + 4][1]
    assert sorted(sum((labels for pp, labels in results if pp == 0), [])) == list(range(8))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16),
                                       torch.nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


def _mse(out, batch):
    return torch.nn.functional.mse_loss(out, batch[1])


def _batches(steps, n=16):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)) for _ in range(steps)]


def _serial(steps, clip):
    torch.manual_seed(0)
    losses, state, _ = train_serial(MLP(), _batches(steps), lambda p: torch.optim.AdamW(p, lr=1e-2), _mse, clip)
    return losses, state


def check_dp_equals_serial(grid_kwargs, clip, microbatches):
    ref_losses, ref_state = _serial(3, clip)
    autopar.init(**grid_kwargs)
    torch.manual_seed(0)
    engine = autopar.parallelize(MLP(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                                 num_microbatches=microbatches, loss_fn=_mse, clip_grad_norm=clip)
    losses = [engine.step(autopar.shard_batch(b)) for b in _batches(3)]
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    full = autopar.full_state_dict(engine)
    assert full.keys() == ref_state.keys()
    for k in full:
        torch.testing.assert_close(full[k], ref_state[k], rtol=1e-5, atol=1e-6, msg=k)
    return losses


@pytest.mark.parametrize("grid_kwargs, clip, microbatches", [
    (dict(dp=4), None, 1),
    (dict(dp=4), 0.05, 2),   # clipping that bites, and accumulation inside one step
    (dict(dp=2, z=2), 0.05, 1),  # z splits the batch too: plain params are summed over dp*z
    (dict(dp=2, x=2), None, 1),  # x ranks share data: no double counting
])
def test_data_parallel_step_equals_serial(pool4, grid_kwargs, clip, microbatches):
    losses = pool4.run(check_dp_equals_serial, grid_kwargs, clip, microbatches)
    assert all(l == losses[0] for l in losses), "loss must be identical on every rank"


def _preloaded() -> bool:
    import sys

    return "pool_preload" in sys.modules


def test_pool_ranks_start_with_their_imports_done(pool2):
    """The fork server skips a preload it cannot import without a word (tests/mp.py): the ranks
    would then import torch and transformers themselves, correct but ~6.5 CPU-s each."""
    assert pool2.run(_preloaded) == [True, True]


def _fail_on_rank0_others_wait():
    autopar.init()
    if dist.get_rank() == 0:
        raise RuntimeError("boom on purpose")
    dist.barrier()


def test_harness_reports_failures_and_hangs():
    from mp import RankPool

    pool = RankPool(2, timeout=60, grace=2)  # rank 1 waits in a barrier rank 0 never joins
    try:
        with pytest.raises(AssertionError, match="(?s)rank 0.*boom on purpose"):
            pool.run(_fail_on_rank0_others_wait)
        assert pool.run(_world_size) == [2, 2]  # the pool restarts after a failure
    finally:
        pool.close()


def _world_size():
    return dist.get_world_size()


def _all_reduce_with_broken_peer(peer_action):
    import os
    import time

    grid = autopar.init(timeout=3)
    if dist.get_rank() == 1:
        if peer_action == "die":
            os._exit(3)
        time.sleep(7)  # stuck: never joins the collective, and outlives rank 0's timeout
        return None
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=grid.group("pp", "dp", "z", "y", "x"))
    except RuntimeError as e:
        raise RuntimeError(f"collective failed after {time.monotonic() - t0:.0f} s: {e}") from None
    return None


@pytest.mark.parametrize("peer_action", ["die", "stuck"])
def test_broken_peer_ends_collective_with_error(peer_action):
    """A dead rank (connection reset) or a stuck one (collective timeout) must make the others
    raise within the configured timeout rather than wait forever."""
    import re

    from mp import RankPool

    pool = RankPool(2, timeout=60)
    try:
        with pytest.raises(AssertionError) as info:
            pool.run(_all_reduce_with_broken_peer, peer_action)
    finally:
        pool.close(force=True)
    seconds = int(re.search(r"collective failed after (\d+) s", str(info.value)).group(1))
    assert seconds <= 10, str(info.value)
