"""Group set-up at scale (issue 16.1): the partitions are the brute-force ones, every rank makes
the same ``new_group`` calls in the same order, one per distinct group (size-1 groups only its
own), and a device-bound world is split once per partition. One process plays any rank of a
large world on torch's fake backend."""
from __future__ import annotations

import itertools
import math
from datetime import timedelta
from typing import Callable, Iterator
from unittest import mock

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from autopar.runtime import grid as grid_mod
from autopar.runtime.grid import AXES, build_groups, coords_of, group_ranks, partition, resolve_sizes

GRIDS = [(48, dict(pp=2, x=2, y=3, z=2)), (64, dict(pp=2, dp=2, x=2, y=2, z=4)), (16, dict(dp=16)),
         (32, dict(pp=2, x=4)), (1, dict())]
COMBOS = [c for n in range(1, len(AXES) + 1) for c in itertools.combinations(AXES, n)]
TIMEOUT = timedelta(seconds=30)


def _brute(axes: tuple[str, ...], rank: int, sizes: dict[str, int]) -> tuple[int, ...]:
    me = coords_of(rank, sizes)
    return tuple(r for r in range(math.prod(sizes.values()))
                 if all(coords_of(r, sizes)[a] == me[a] for a in AXES if a not in axes))


@pytest.mark.parametrize("world,kwargs", GRIDS)
def test_partitions_are_the_brute_force_ones(world: int, kwargs: dict[str, int]) -> None:
    sizes = resolve_sizes(world, **kwargs)
    for axes in COMBOS:
        expected = sorted({_brute(axes, r, sizes) for r in range(world)})
        assert partition(axes, sizes) == expected, axes
        for r in range(world):
            assert group_ranks(axes, r, sizes) == _brute(axes, r, sizes)
    assert partition((), sizes) == [(r,) for r in range(world)]


@pytest.fixture
def fake_world() -> Iterator[Callable[[int, int], None]]:
    def start(world: int, rank: int) -> None:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def _expected_calls(sizes: dict[str, int]) -> list[list[int]]:
    """The old enumeration's distinct memberships in its order, less what autopar no longer
    makes with new_group: the world (reused) and size-1 groups (each rank makes its own)."""
    seen: list[tuple[int, ...]] = []
    world = math.prod(sizes.values())
    for axes in COMBOS:
        for members in sorted({_brute(axes, r, sizes) for r in range(world)}):
            if members not in seen:
                seen.append(members)
    return [list(m) for m in seen if 1 < len(m) < world]


@pytest.mark.parametrize("world,kwargs", GRIDS)
@pytest.mark.parametrize("last", [False, True])
def test_every_rank_makes_the_same_groups_in_the_same_order(fake_world, world: int, kwargs: dict[str, int],
                                                            last: bool) -> None:
    rank = world - 1 if last else 0
    fake_world(world, rank)
    sizes = resolve_sizes(world, **kwargs)
    with mock.patch.object(dist, "new_group", wraps=dist.new_group) as spy:
        groups = build_groups(sizes, rank, TIMEOUT, reuse_world=True)
    shared = [c.args[0] for c in spy.call_args_list if not c.kwargs.get("use_local_synchronization")]
    local = [c.args[0] for c in spy.call_args_list if c.kwargs.get("use_local_synchronization")]
    assert shared == _expected_calls(sizes)
    assert all(c.kwargs["timeout"] == TIMEOUT for c in spy.call_args_list)
    has_size_one = any(sizes[a] == 1 for a in AXES) and world > 1
    assert local == ([[rank]] if has_size_one else [])
    for axes in COMBOS:
        group = groups[axes]
        assert tuple(dist.get_process_group_ranks(group)) == _brute(axes, rank, sizes), axes
        assert (group is dist.group.WORLD) == (len(_brute(axes, rank, sizes)) == world)


def test_a_user_world_is_not_reused(fake_world) -> None:
    fake_world(8, 3)
    sizes = resolve_sizes(8, dp=8)
    groups = build_groups(sizes, 3, TIMEOUT, reuse_world=False)
    assert groups[("dp",)] is not dist.group.WORLD
    assert dist.get_process_group_ranks(groups[("dp",)]) == list(range(8))


def test_set_up_is_linear_in_the_world(fake_world) -> None:
    """At 16,384 ranks the calls are the distinct groups (about 1.3 x world here), not world^2 work:
    the old enumeration could not finish this within pytest's patience."""
    world = 16384
    fake_world(world, world - 1)
    sizes = resolve_sizes(world, pp=8, x=8, y=4, z=2)
    with mock.patch.object(dist, "new_group", wraps=dist.new_group) as spy:
        build_groups(sizes, world - 1, TIMEOUT, reuse_world=True)
    nontrivial = [a for a in AXES if sizes[a] > 1]
    distinct = sum(world // math.prod(sizes[a] for a in sub)
                   for n in range(1, len(nontrivial) + 1) for sub in itertools.combinations(nontrivial, n))
    assert spy.call_count == distinct - 1  # the whole world is the default group


def test_a_device_bound_world_is_split_once_per_partition(fake_world) -> None:
    world, rank = 16, 5
    fake_world(world, rank)
    sizes = resolve_sizes(world, pp=2, x=2, y=2)  # dp=2, z=1
    mine = {}

    def split_group(*, split_ranks: list[list[int]], timeout: timedelta, group_desc: str) -> object:
        assert timeout == TIMEOUT
        key = object()
        mine[key] = next(g for g in split_ranks if rank in g)
        calls.append(split_ranks)
        return key

    calls: list[list[list[int]]] = []
    with mock.patch.object(grid_mod, "_splits_world", return_value=True), \
            mock.patch.object(dist, "split_group", side_effect=split_group), \
            mock.patch.object(dist, "new_group") as new_group:
        groups = build_groups(sizes, rank, TIMEOUT, reuse_world=True)
    new_group.assert_not_called()
    nontrivial = ("pp", "dp", "y", "x")
    # Partitions in the order of first use (z's is every rank alone); all four axes: the world.
    first_use: list[tuple[str, ...]] = []
    for axes in COMBOS:
        reduced = tuple(a for a in axes if sizes[a] > 1)
        if reduced not in first_use and len(reduced) < len(nontrivial):
            first_use.append(reduced)
    assert calls == [[list(g) for g in partition(sub, sizes)] for sub in first_use]
    assert len(calls) == 2 ** len(nontrivial) - 1  # 14 proper subsets plus (), none twice
    for axes in COMBOS:
        group = groups[axes]
        if group is dist.group.WORLD:
            assert tuple(a for a in axes if sizes[a] > 1) == nontrivial
        else:
            assert tuple(mine[group]) == _brute(axes, rank, sizes)
