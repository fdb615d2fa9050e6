"""The five-axis grid of ranks and every process group built over it.

Rank order (outermost first): ``pp, dp, z, y, x``. A rank's global number is the mixed-radix
number of its coordinates in that order, so ``x`` varies fastest. Tensor-parallel axes are
innermost because their collectives run inside every layer and must stay inside a node;
``pp`` is outermost because stages only exchange activations point to point.

Groups are created eagerly for every non-empty combination of axes, deduplicated by membership
(``group("x", "pp")`` is ``group("x")`` when pp=1). Creating them lazily would need every rank to
ask for the same group at the same moment, which is exactly the kind of hidden coupling that
hangs jobs.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

AXES: tuple[str, ...] = ("pp", "dp", "z", "y", "x")
TP_AXES: tuple[str, ...] = ("z", "y", "x")


def _canon(axes: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [a for a in axes if a not in AXES]
    if unknown or not axes:
        raise ValueError(f"unknown grid axes {unknown or axes}; the axes are {AXES}")
    return tuple(a for a in AXES if a in axes)


def resolve_sizes(world_size: int, pp: int = 1, dp: int | None = None, x: int = 1, y: int = 1,
                  z: int = 1) -> dict[str, int]:
    """Check a requested grid against the world size and infer ``dp``. Raises ``ValueError``
    with the sizes and the fix; every rank computes the same answer, so all of them raise."""
    named = {"pp": pp, "x": x, "y": y, "z": z}
    if dp is not None:
        named["dp"] = dp
    for name, size in named.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"grid axis {name}={size!r} must be a positive integer")
    model_ranks = pp * x * y * z
    if dp is None:
        if world_size % model_ranks:
            raise ValueError(
                f"world size {world_size} is not divisible by pp*x*y*z = {model_ranks} "
                f"(pp={pp}, x={x}, y={y}, z={z}); launch a multiple of {model_ranks} ranks "
                "or choose a grid whose product divides the world size")
        dp = world_size // model_ranks
    if model_ranks * dp != world_size:
        raise ValueError(
            f"grid pp={pp} dp={dp} x={x} y={y} z={z} has {model_ranks * dp} ranks but the world "
            f"has {world_size}; launch {model_ranks * dp} ranks, or leave dp out to infer it")
    return {"pp": pp, "dp": dp, "z": z, "y": y, "x": x}


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


def group_ranks(axes: tuple[str, ...], rank: int, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Global ranks that share every coordinate of ``rank`` outside ``axes``, ascending. The
    position of a rank in this tuple is its group rank."""
    axes = _canon(axes)
    base = coords_of(rank, sizes)
    members = []
    for combo in itertools.product(*(range(sizes[a]) for a in axes)):
        members.append(rank_of({**base, **dict(zip(axes, combo))}, sizes))
    return tuple(sorted(members))


def build_groups(sizes: Mapping[str, int], rank: int, timeout: timedelta,
                 reuse_world: bool) -> dict[tuple[str, ...], dist.ProcessGroup]:
    """Create one process group per distinct membership. Every rank walks the same list in the
    same order, as ``new_group`` requires; a rank keeps the groups it belongs to.

    ``reuse_world`` lets the all-ranks group be the default group; only do so when that group
    was created with our timeout, or a user-made world would keep its own (longer) one."""
    world = math.prod(sizes.values())
    by_members: dict[tuple[int, ...], dist.ProcessGroup] = {}
    mine: dict[tuple[str, ...], dist.ProcessGroup] = {}
    for n in range(1, len(AXES) + 1):
        for axes in itertools.combinations(AXES, n):
            partition = sorted({group_ranks(axes, r, sizes) for r in range(world)})
            for members in partition:
                if members not in by_members:
                    if reuse_world and len(members) == world:
                        by_members[members] = dist.group.WORLD
                    else:
                        by_members[members] = dist.new_group(list(members), timeout=timeout)
            mine[axes] = by_members[group_ranks(axes, rank, sizes)]
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
        return math.prod(self.sizes[a] for a in (_canon(axes) if axes else ()))

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
        return self.sizes["dp"] * self.sizes["z"]

    @property
    def batch_shard_index(self) -> int:
        return self.index("dp", "z")

    def __str__(self) -> str:
        grid = " x ".join(f"{a}={self.sizes[a]}" for a in AXES)
        return f"Grid({grid}; rank {self.rank} at {self.coords}, {self.backend} on {self.device})"
