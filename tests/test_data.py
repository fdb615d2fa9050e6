"""autopar.data: the index math without processes (explicit shard/num_shards), then one 4-rank
check that the loader agrees with ``autopar.shard_batch`` on a real grid."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import IterableDataset, TensorDataset

import autopar
from autopar.data import GlobalBatchSampler, loader
from autopar.data import order as data_order
from autopar.runtime import batch as batch_mod

CASES = [  # (num_samples, global_batch, num_shards, local_shuffle)
    (96, 16, 4, None), (100, 12, 3, None), (64, 8, 1, None),
    (96, 16, 4, 0.25), (101, 12, 3, 0.5), (64, 8, 2, 1.0), (80, 8, 4, 0.0),
]


def samplers(n_samples, gbs, n_shards, local, **kw):
    return [GlobalBatchSampler(n_samples, gbs, shard=s, num_shards=n_shards, local_shuffle=local, **kw)
            for s in range(n_shards)]


def epoch_batches(sampler, epoch):
    return [sampler.indices(epoch * sampler.steps_per_epoch + b) for b in range(sampler.steps_per_epoch)]


@pytest.mark.parametrize("n_samples,gbs,n_shards,local", CASES)
def test_every_sample_at_most_once_per_epoch_and_exactly_once_when_it_divides(n_samples, gbs, n_shards, local):
    shards = samplers(n_samples, gbs, n_shards, local, seed=3)
    for epoch in range(3):
        seen = [i for s in shards for batch in epoch_batches(s, epoch) for i in batch]
        assert len(seen) == (n_samples // gbs) * gbs
        assert len(set(seen)) == len(seen) and all(0 <= i < n_samples for i in seen)
        if local is None and n_samples % gbs == 0:
            assert sorted(seen) == list(range(n_samples))


@pytest.mark.parametrize("n_samples,gbs,n_shards,local", CASES)
def test_shards_concatenate_to_the_global_batch_as_shard_batch_cuts_it(monkeypatch, n_samples, gbs, n_shards, local):
    shards = samplers(n_samples, gbs, n_shards, local, seed=1)
    for step in [0, 1, shards[0].steps_per_epoch - 1, shards[0].steps_per_epoch, 3 * shards[0].steps_per_epoch + 2]:
        global_batch = shards[0].global_indices(step)
        assert len(global_batch) == gbs
        assert torch.equal(torch.cat([torch.tensor(s.indices(step)) for s in shards]), global_batch)
        for s in shards:  # the real shard_batch, on a stand-in grid of dp*z = n_shards
            fake = SimpleNamespace(batch_shards=n_shards, batch_shard_index=s.shard, sizes={"dp": n_shards, "z": 1})
            monkeypatch.setattr(batch_mod, "current_grid", lambda fake=fake: fake)
            assert autopar.shard_batch(global_batch).tolist() == s.indices(step)


def stream(sampler, steps):
    out = []
    while len(out) < steps:
        out += list(sampler)  # one epoch (or its rest) per iter(), as a training loop would
    return out[:steps]


@pytest.mark.parametrize("n_samples,gbs,n_shards,local", CASES)
def test_resume_at_any_step_equals_the_uninterrupted_run(n_samples, gbs, n_shards, local):
    shard = n_shards - 1
    full = stream(GlobalBatchSampler(n_samples, gbs, shard=shard, num_shards=n_shards, local_shuffle=local,
                                     seed=7), 40)
    spe = n_samples // gbs
    for k in sorted({0, 1, spe - 1, spe, spe + 1, 2 * spe + spe // 2, 3 * spe, 39}):
        resumed = GlobalBatchSampler(n_samples, gbs, shard=shard, num_shards=n_shards, local_shuffle=local,
                                     seed=7, start_step=k)
        assert stream(resumed, 40 - k) == full[k:], k
        via_state = GlobalBatchSampler(n_samples, gbs, shard=shard, num_shards=n_shards, local_shuffle=local, seed=7)
        via_state.load_state_dict(resumed.state_dict(step=k))
        assert stream(via_state, 40 - k) == full[k:], k


def test_state_dict_tracks_position_and_survives_going_back_in_time():
    s = GlobalBatchSampler(50, 10, shard=0, num_shards=2, local_shuffle=0.3, seed=2)
    it = iter(s)
    taken = [next(it) for _ in range(3)]
    assert s.state_dict()["step"] == 3 and s.epoch == 0 and len(s) == 2
    later = [s.indices(k) for k in range(20, 23)]  # replays exchanges forward ...
    assert [s.indices(k) for k in range(3)] == taken  # ... and back to epoch 0 from scratch
    fresh = GlobalBatchSampler(50, 10, shard=0, num_shards=2, local_shuffle=0.3, seed=2)
    assert [fresh.indices(k) for k in range(20, 23)] == later


def test_deterministic_across_instances_and_varies_with_seed_and_epoch():
    def first_epochs(seed, local):
        s = GlobalBatchSampler(64, 8, shard=1, num_shards=2, seed=seed, local_shuffle=local)
        return [epoch_batches(s, e) for e in range(3)]
    for local in (None, 0.5):
        assert first_epochs(5, local) == first_epochs(5, local)
        assert first_epochs(5, local) != first_epochs(6, local)
        e0, e1, _ = first_epochs(5, local)
        assert e0 != e1


def test_no_shuffle_reads_in_order():
    s = GlobalBatchSampler(20, 8, shard=1, num_shards=2, shuffle=False)
    assert list(s) == [[4, 5, 6, 7], [12, 13, 14, 15]]
    assert s.moved_samples(1) == 0


def test_drop_last_false_fills_the_ragged_batch_by_wrapping():
    shards = samplers(20, 8, 2, None, shuffle=False, drop_last=False)
    assert shards[0].steps_per_epoch == 3
    assert shards[0].global_indices(2).tolist() == [16, 17, 18, 19, 0, 1, 2, 3]
    for local in (None, 0.5):
        shards = samplers(21, 8, 2, local, drop_last=False, seed=4)
        seen = [i for s in shards for batch in epoch_batches(s, 1) for i in batch]
        assert len(seen) == 3 * 8 and set(seen) == set(range(21))


@pytest.mark.parametrize("n_shards,fraction", [(2, 0.25), (4, 0.5), (3, 0.4), (8, 0.1), (2, 1.0)])
def test_local_shuffle_moves_the_expected_fraction_and_keeps_partitions_disjoint(n_shards, fraction):
    n = 960
    s = GlobalBatchSampler(n, 8 * n_shards, shard=0, num_shards=n_shards, local_shuffle=fraction, seed=11)
    size = n // n_shards
    pairs_seen = set()
    for epoch in range(1, 5):
        pairs = data_order.pairs(n_shards, 11, epoch)
        pairs_seen.add(tuple(sorted(tuple(sorted(p)) for p in pairs)))
        moved = s.moved_samples(epoch)
        assert moved == 2 * len(pairs) * round(fraction * size)
        assert moved == pytest.approx(fraction * n * (n_shards - n_shards % 2) / n_shards, abs=n_shards)
        owners = s.owners(epoch)
        assert (owners >= 0).all() and torch.bincount(owners).tolist() == [size] * n_shards
        for shard in range(n_shards):  # a shard reads only from its own partition
            read = torch.tensor([i for b in range(s.steps_per_epoch)
                                 for i in s.shard_indices(epoch * s.steps_per_epoch + b, shard).tolist()])
            assert (owners[read] == shard).all()
    if n_shards > 2:
        assert len(pairs_seen) > 1  # partners change from epoch to epoch


def test_local_shuffle_zero_keeps_partitions_and_global_shuffle_moves_most_samples():
    n, shards = 4000, 4
    still = GlobalBatchSampler(n, 16, shard=0, num_shards=shards, local_shuffle=0.0, seed=1)
    assert still.moved_samples(1) == still.moved_samples(5) == 0
    assert torch.equal(still.owners(3), torch.arange(n) // (n // shards))  # contiguous partitions
    rand = GlobalBatchSampler(n, 16, shard=0, num_shards=shards, local_shuffle=0.0, seed=1, partition="random")
    assert not torch.equal(rand.owners(0), still.owners(0))
    glob = GlobalBatchSampler(n, 16, shard=0, num_shards=shards, seed=1)
    assert glob.moved_samples(1) == pytest.approx(n * (shards - 1) / shards, rel=0.05)
    local = GlobalBatchSampler(n, 16, shard=0, num_shards=shards, local_shuffle=0.1, seed=1)
    assert local.moved_samples(1) == 400  # a tenth of the samples instead of three quarters


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(global_batch_size=10, num_shards=4), ValueError, "not divisible by the 4 batch shards"),
    (dict(data_source=7, global_batch_size=8), ValueError, "fewer than one global batch"),
    (dict(local_shuffle=1.5), ValueError, r"must be a fraction in \[0, 1\]"),
    (dict(local_shuffle=-0.1), ValueError, r"must be a fraction in \[0, 1\]"),
    (dict(local_shuffle=True), ValueError, r"must be a fraction in \[0, 1\]"),
    (dict(local_shuffle=0.5, shuffle=False), ValueError, "needs shuffle=True"),
    (dict(shard=2, num_shards=2), ValueError, r"must be an integer in \[0, 2\)"),
    (dict(shard=0, num_shards=None), ValueError, "give both shard= and num_shards="),
    (dict(shard=None, num_shards=None), RuntimeError, "not initialised"),
    (dict(global_batch_size=0), ValueError, "positive integer"),
    (dict(start_step=-1), ValueError, "non-negative"),
    (dict(partition="striped"), ValueError, "partition="),
])
def test_bad_inputs_fail_clearly(kwargs, error, match):
    args = {"data_source": 64, "global_batch_size": 8, "shard": 0, "num_shards": 2, **kwargs}
    with pytest.raises(error, match=match):
        GlobalBatchSampler(args.pop("data_source"), args.pop("global_batch_size"), **args)


def test_load_state_dict_refuses_another_stream():
    state = GlobalBatchSampler(64, 8, shard=0, num_shards=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        GlobalBatchSampler(64, 8, shard=0, num_shards=2, seed=2).load_state_dict(state)
    other_grid = GlobalBatchSampler(64, 8, shard=1, num_shards=4, seed=1)
    other_grid.load_state_dict({**state, "step": 5})  # a global shuffle reshards fine
    assert other_grid.step == 5
    local = GlobalBatchSampler(64, 8, shard=0, num_shards=2, seed=1, local_shuffle=0.5).state_dict()
    with pytest.raises(ValueError, match="num_shards"):
        GlobalBatchSampler(64, 8, shard=0, num_shards=4, seed=1, local_shuffle=0.5).load_state_dict(local)


def test_loader_yields_dataset_rows_of_this_shard():
    data = TensorDataset(torch.arange(40) * 10, torch.arange(40))
    dl = loader(data, 8, shard=1, num_shards=4, seed=3, start_step=2)
    assert dl.batch_sampler.step == 2 and len(dl) == 3
    batches = list(dl)
    assert len(batches) == 3 and dl.batch_sampler.step == 5
    for k, (x, i) in enumerate(batches):
        assert i.tolist() == dl.batch_sampler.indices(2 + k) and torch.equal(x, i * 10)
    with pytest.raises(TypeError):
        loader(data, 8, shard=1, num_shards=4, shufle=False)  # a typo is an error, not ignored

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(10))
    with pytest.raises(TypeError, match="map-style dataset"):
        loader(Stream(), 8, shard=0, num_shards=1)


def _loader_matches_shard_batch(local_shuffle):
    grid = autopar.init(dp=2, x=2)
    data = TensorDataset(torch.arange(64) * 3)
    dl = loader(data, 8, seed=5, local_shuffle=local_shuffle, start_step=6)  # grid decides the shard
    reference = GlobalBatchSampler(64, 8, seed=5, local_shuffle=local_shuffle, shard=0,
                                   num_shards=grid.batch_shards)
    mine = []
    for k, (x,) in enumerate(itertools.islice(itertools.chain(dl, dl), 6)):  # crosses into epoch 1
        expected = autopar.shard_batch(data[reference.global_indices(6 + k)][0])
        assert torch.equal(x, expected)
        mine.append(x.tolist())
    return grid.coords, mine


def test_loader_on_a_real_grid_gives_each_rank_its_shard_batch(pool4):
    for local_shuffle in (None, 0.5):
        results = pool4.run(_loader_matches_shard_batch, local_shuffle)
        by_dp = {}
        for coords, batches in results:
            by_dp.setdefault(coords["dp"], []).append(batches)
        assert len(by_dp) == 2
        for same in by_dp.values():  # ranks that differ only in x read the same samples
            assert len(same) == 2 and same[0] == same[1]
        assert by_dp[0] != by_dp[1]


def test_loader_pins_memory_when_batches_go_to_cuda(monkeypatch):
    """The engine copies batches with non_blocking=True, which overlaps only from pinned memory:
    pinned by default exactly when the batches go to a CUDA device; an explicit choice wins."""
    import importlib

    loader_module = importlib.import_module("autopar.data.loader")  # the package exports the function
    data = TensorDataset(torch.arange(8.0))
    monkeypatch.setattr(loader_module, "_batches_go_to_cuda", lambda: True)
    assert loader(data, 4, shard=0, num_shards=1).pin_memory is True
    assert loader(data, 4, shard=0, num_shards=1, pin_memory=False).pin_memory is False
    monkeypatch.setattr(loader_module, "_batches_go_to_cuda", lambda: False)
    assert loader(data, 4, shard=0, num_shards=1).pin_memory is False


# --- the batch peers' check (runtime.batch.BatchCheck) ------------------------------------------

def test_fingerprint_sees_values_shapes_and_keys_but_not_dict_order_or_nan():
    ids = torch.arange(12).reshape(3, 4)
    base = batch_mod.fingerprint({"input_ids": ids, "labels": ids, "flag": True}, torch.device("cpu"))
    same = batch_mod.fingerprint({"flag": True, "labels": ids.clone(), "input_ids": ids.clone()}, torch.device("cpu"))
    assert torch.equal(base, same)
    swapped = ids.clone()
    swapped[0, :2] = swapped[0, :2].flip(0)  # same multiset of values, another order
    for other in ({"input_ids": swapped, "labels": ids, "flag": True},
                  {"input_ids": ids[:, :3], "labels": ids[:, :3], "flag": True},
                  {"input_ids": ids, "labels": ids, "flag": False},
                  {"input_ids": ids, "target": ids, "flag": True},
                  {"input_ids": ids.float(), "labels": ids, "flag": True}):
        assert not torch.equal(base, batch_mod.fingerprint(other, torch.device("cpu"))), other
    assert torch.equal(batch_mod.fingerprint({"ids": ids, "extra": object()}, torch.device("cpu")),
                       batch_mod.fingerprint({"ids": ids, "extra": object()}, torch.device("cpu")))  # no address
    nan = torch.tensor([1.0, float("nan")])
    cpu = torch.device("cpu")
    assert torch.equal(batch_mod.fingerprint(nan, cpu), batch_mod.fingerprint(nan.clone(), cpu))


def _peers_given_other_batches(grid: dict, odd: tuple[int, ...], change: str, at_call: int, every: bool) -> list[int]:
    """Ranks train a small MLP; from call ``at_call`` on, the ranks ``odd`` change their batch
    (call 5 is an ``eval_step``). Returns the calls that completed."""
    import os

    os.environ.pop(batch_mod.CHECK_ENV, None)
    if every:
        os.environ[batch_mod.CHECK_ENV] = "every"
    try:
        autopar.init(**grid)
        with autopar.auto_parallelize():
            model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        engine = autopar.parallelize(model, lambda p: torch.optim.SGD(p, lr=0.1), num_microbatches=grid.get("pp", 1),
                                     loss_fn=lambda out, b: (out - b[1]).pow(2).mean())
    finally:
        os.environ.pop(batch_mod.CHECK_ENV, None)
    changes = {"values": lambda v: v + 1, "shape": lambda v: v[:, :3], "rows": lambda v: v[:2]}
    g = torch.Generator().manual_seed(0)
    done = []
    for call in range(1, 6):
        batch = autopar.shard_batch((torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)))
        if call >= at_call and torch.distributed.get_rank() in odd:
            batch = tuple(changes[change](v) for v in batch)
        (engine.eval_step if call == 5 else engine.step)(batch)
        done.append(call)
    return done


# Rank order: pp outermost, x innermost. dp=2 x x=2: x peers {0, 1}, {2, 3}. pp=2 x dp=2: pipeline
# peers {0, 2}, {1, 3}; dp peers {0, 1}, {2, 3}.
@pytest.mark.parametrize("grid,odd,change,at_call,every,caught", [
    (dict(dp=2, x=2), (1, 3), "values", 1, False, 1),  # x peers: silently wrong before the check
    (dict(dp=2, x=2), (3,), "shape", 2, False, 2),    # NCCL would hang in the first tensor-parallel collective
    (dict(pp=2, dp=2), (2,), "values", 3, False, 4),  # a pipeline stage; calls 1, 2, 4, 8... are checked
    (dict(pp=2, dp=2), (2,), "values", 3, True, 3),   # ... and every call with AUTOPAR_CHECK_BATCH=every
    (dict(pp=2, dp=2), (1, 3), "rows", 1, True, None),  # dp replicas may differ (their own data)
], ids=["x-values", "x-shape", "pp-values-log", "pp-values-every", "dp-rows"])
def test_ranks_of_one_data_shard_must_get_the_same_batch(pool4, grid, odd, change, at_call, every, caught):
    if caught is None:
        assert pool4.run(_peers_given_other_batches, grid, odd, change, at_call, every)[0] == [1, 2, 3, 4, 5]
        return
    with pytest.raises(AssertionError) as info:
        pool4.run(_peers_given_other_batches, grid, odd, change, at_call, every)
    text = str(info.value)
    assert "failed on 4 ranks" in text, text
    what = "shapes, dtypes or keys" if change == "shape" else "values"
    assert f"must get the same batch, but [{odd[0]}] got other {what} than rank" in text, text
    assert f"(call {caught})" in text and "autopar.shard_batch(global_batch)" in text, text
