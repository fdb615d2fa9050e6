"""The five-axis grid of ranks and every process group built over it.

Rank order (outermost first): ``pp, dp, z, y, x``. A rank's global number is the mixed-radix
number of its coordinates in that order, so ``x`` varies fastest. Tensor-parallel axes are
innermost because their collectives run inside every layer and must stay inside a node;
``pp`` is outermost because stages only exchange activations point to point.

Groups are created eagerly for every non-empty combination of axes. Creating them lazily would
need every rank to ask for the same group at the same moment, which is exactly the kind of hidden
coupling that hangs jobs. How, and why this way:

* Each combination's groups are one partition of the world, enumerated directly (a base rank per
  group plus the same strided offsets), so set-up is O(world) per combination, not O(world^2).
* Axes of size 1 change nothing: ``group("x", "pp")`` is ``group("x")`` when pp=1, so a
  combination is reduced to its axes of size > 1 and each distinct partition is created once
  (two different reduced sets never share a group, so this is deduplication by membership).
* A device-bound NCCL world (autopar passes ``device_id`` when it creates one) turns every
  ``new_group`` into an ``ncclCommSplit`` that all world ranks must enter, members or not:
  O(world) world-wide splits. There ``dist.split_group`` makes a whole partition in one split,
  at most 31 of them. It is used only on a world autopar created, because its group names hash
  the process's group count, which a user's earlier sub-groups may have made differ across ranks.
* Otherwise every rank calls ``new_group`` for every group, in the same order with the same
  arguments, as torch requires. ``use_local_synchronization=True`` (non-members skip the call)
  is not used for these: on a device-bound world the skipped ranks would never enter the split,
  and its hashed names go wrong once ranks have made different numbers of groups. Its one safe
  use is the all-size-1 partition on a world that does not split: a rank's own group has no
  other member to agree with, so each rank makes just its own, O(1) instead of O(world) calls.
* ``dist.new_subgroups_by_enumeration`` is that same ``new_group`` loop with overlap checks; it
  would save nothing and could not hand back the world group for the all-ranks partition.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from .gridspec import AXES, BATCH_AXES, TP_AXES, resolve_sizes  # noqa: F401 - re-exported: the grid's own names

def _canon(axes: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [a for a in axes if a not in AXES]
    if unknown or not axes:
        raise ValueError(f"unknown grid axes {unknown or axes}; the axes are {AXES}")
    return tuple([a for a in AXES if a in axes])


def coords_of(rank: int, sizes: Mapping[str, int]) -> dict[str, int]:
    coords = {}
    for axis in reversed(AXES):
        coords[axis] = rank % sizes[axis]
        rank //= sizes[axis]
    return {a: coords[a] for a in AXES}


def rank_of(coords: Mapping[str, int], sizes: Mapping[str, int]) -> int:
    rank = 0
    for axis in AXES:
        rank = rank * sizes[axis] + coords[axis]
    return rank


def _strides(sizes: Mapping[str, int]) -> dict[str, int]:
    """How far apart two ranks are that differ by one on an axis (x is 1, pp the largest)."""
    strides, step = {}, 1
    for axis in reversed(AXES):
        strides[axis] = step
        step *= sizes[axis]
    return strides


def _offsets(axes: tuple[str, ...], sizes: Mapping[str, int]) -> list[int]:
    """Every sum of ``coordinate * stride`` over ``axes``, ascending: the product runs outermost
    axis first, like the rank order itself."""
    strides = _strides(sizes)
    return [sum(c * strides[a] for a, c in zip(axes, combo))
            for combo in itertools.product(*(range(sizes[a]) for a in axes))]


def partition(axes: tuple[str, ...], sizes: Mapping[str, int]) -> list[tuple[int, ...]]:
    """Every group over ``axes`` (``()``: every rank alone), each ascending, ordered by first
    member. O(world): a group is a base rank, zero on ``axes``, plus the same offsets."""
    axes = _canon(axes) if axes else ()
    inside = _offsets(axes, sizes)
    return [tuple(base + o for o in inside)
            for base in _offsets(tuple(a for a in AXES if a not in axes), sizes)]


def group_ranks(axes: tuple[str, ...], rank: int, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Global ranks that share every coordinate of ``rank`` outside ``axes``, ascending. The
    position of a rank in this tuple is its group rank."""
    axes = _canon(axes)
    coords, strides = coords_of(rank, sizes), _strides(sizes)
    base = rank - sum(coords[a] * strides[a] for a in axes)
    return tuple(base + o for o in _offsets(axes, sizes))


def _splits_world() -> bool:
    """Whether new groups are split off the world's communicator (a device-bound NCCL world)."""
    world = dist.group.WORLD
    device = world.bound_device_id
    return device is not None and world._get_backend(device).supports_splitting


def _make(axes: tuple[str, ...], sizes: Mapping[str, int], rank: int, timeout: timedelta,
          own_world: bool, splits: bool) -> dist.ProcessGroup:
    """This rank's group of the partition over ``axes`` (reduced to sizes > 1), creating the
    partition's groups on every rank at once (see the module docstring for the choice)."""
    desc = "autopar:" + (",".join(axes) or "self")
    groups = partition(axes, sizes)
    if own_world and len(groups) == 1:
        return dist.group.WORLD
    if own_world and splits:
        return dist.split_group(split_ranks=[list(g) for g in groups], timeout=timeout, group_desc=desc)
    if not axes and not splits and dist.get_backend() != dist.Backend.MPI:  # MPI refuses local sync
        return dist.new_group([rank], timeout=timeout, use_local_synchronization=True, group_desc=desc)
    made = [dist.new_group(list(members), timeout=timeout, group_desc=desc) for members in groups]
    coords, index = coords_of(rank, sizes), 0
    for a in AXES:  # groups are ordered by base rank: this rank's coordinates off ``axes``
        if a not in axes:
            index = index * sizes[a] + coords[a]
    return made[index]


def build_groups(sizes: Mapping[str, int], rank: int, timeout: timedelta,
                 reuse_world: bool) -> dict[tuple[str, ...], dist.ProcessGroup]:
    """Create one process group per distinct membership, every rank walking the same partitions
    in the same order; a rank keeps the groups it belongs to.

    ``reuse_world`` means autopar created the world with our timeout: the all-ranks group may
    then be the default group (a user-made world would keep its own, longer, timeout), and no
    user sub-group exists yet, so partitions may be made by ``split_group``."""
    splits = _splits_world()
    made: dict[tuple[str, ...], dist.ProcessGroup] = {}
    mine: dict[tuple[str, ...], dist.ProcessGroup] = {}
    for n in range(1, len(AXES) + 1):
        for axes in itertools.combinations(AXES, n):
            reduced = tuple(a for a in axes if sizes[a] > 1)
            if reduced not in made:
                made[reduced] = _make(reduced, sizes, rank, timeout, reuse_world, splits)
            mine[axes] = made[reduced]
    return mine


@dataclass(frozen=True)
class Grid:
    """This rank's place in the pp x dp x z x y x x grid and the groups over it. Immutable:
    ``autopar.init`` makes one and ``autopar.destroy`` drops it."""

    sizes: Mapping[str, int]
    rank: int
    local_rank: int
    launcher: str
    backend: str
    device: torch.device
    _groups: Mapping[tuple[str, ...], dist.ProcessGroup] = field(repr=False, compare=False)

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes.values())

    @property
    def coords(self) -> dict[str, int]:
        return coords_of(self.rank, self.sizes)

    def size(self, *axes: str) -> int:
        """Number of ranks spanned by ``axes`` (1 for no axes)."""
        n = 1
        for a in _canon(axes) if axes else ():  # a loop: torch.compile traces it without a graph break
            n *= self.sizes[a]
        return n

    def index(self, *axes: str) -> int:
        """This rank's position inside ``group(*axes)``: its coordinates on ``axes`` as one
        mixed-radix number, outermost axis first."""
        c = self.coords
        idx = 0
        for a in _canon(axes):
            idx = idx * self.sizes[a] + c[a]
        return idx

    def ranks(self, *axes: str) -> tuple[int, ...]:
        return group_ranks(axes, self.rank, self.sizes)

    def group(self, *axes: str) -> dist.ProcessGroup:
        """The process group over ``axes`` that contains this rank, e.g. ``group("dp", "z")``."""
        return self._groups[_canon(axes)]

    @property
    def batch_shards(self) -> int:
        """How many different slices of the global batch exist at once: data replicas times depth,
        since the 3D matmul splits the batch over ``z`` as well."""
        return self.size(*BATCH_AXES)

    @property
    def batch_peer_axes(self) -> tuple[str, ...]:
        """The axes whose ranks get the same slice of the batch (``shard_batch``)."""
        return tuple(a for a in AXES if a not in BATCH_AXES)

    @property
    def batch_shard_index(self) -> int:
        return self.index(*BATCH_AXES)

    def __str__(self) -> str:
        grid = " x ".join(f"{a}={self.sizes[a]}" for a in AXES)
        return f"Grid({grid}; rank {self.rank} at {self.coords}, {self.backend} on {self.device})"
