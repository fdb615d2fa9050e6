"""Process-group set-up at scale (issue 16.1): what ``build_groups`` costs one rank of a large world.

Why the fake backend: set-up is the one part of autopar whose cost grows with the world, and
nobody has 16,384 ranks at hand. On torch's ``fake`` backend (``FakeStore``) one process plays
any single rank of any world: ``new_group`` does all of torch's own bookkeeping for every group,
members or not, but no rendezvous, so the time measured is autopar's enumeration plus torch's
per-call overhead, a lower bound on a real launch and exactly the part that used to be O(world^2).

For each world size and a few representative 5-D grids, rank 0 and the last rank each build their
groups in a fresh world. Per row:

* ``new_group`` calls this rank makes (``autopar.init`` reuses its own world as the all-ranks group);
* ``split_group`` calls on a device-bound NCCL world instead (one per partition; counted with a
  stub, since the fake backend cannot split: the real split's cost is NCCL's, not autopar's);
* distinct groups this rank belongs to (the world included) and the seconds for rank 0 and last,
  as process CPU time and wall time (nothing on the fake backend waits, so CPU time is the cost
  itself and wall time what a loaded, shared machine added to it);
* the code before commit e3e2f64, analytically: its ``new_group`` calls (every distinct membership,
  size-1 groups included, the world reused) and its enumeration steps, sum over the 31 axis
  combinations of world x group size (every rank enumerated every rank's group: world^2 terms).

The issue measured the old code at 32 ranks: 211 calls, 0.0 s; 256 ranks: 869 calls, 1.6 s;
1,024 ranks: 2,621 calls, 29.9 s. Those counts include the world group; the grids marked
"issue" have the sizes that reproduce them (all-2; 4,4,4,2,2; 8,8,4,2,2).

    OMP_NUM_THREADS=1 python bench/bench_setup.py [--worlds 8 64 256 1024 4096 16384]
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from datetime import timedelta
from typing import Any
from unittest import mock

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from autopar.runtime import grid as grid_mod
from autopar.runtime.grid import AXES, build_groups, resolve_sizes
from tables import table  # bench/ is on sys.path: the scripts run as files

TIMEOUT = timedelta(seconds=60)
COMBOS = [c for n in range(1, len(AXES) + 1) for c in itertools.combinations(AXES, n)]
ISSUE_GRIDS = {32: dict(pp=2, dp=2, z=2, y=2, x=2), 256: dict(pp=4, dp=4, z=4, y=2, x=2),
               1024: dict(pp=8, dp=8, z=4, y=2, x=2)}


def grids(world: int) -> list[tuple[str, dict[str, int]]]:
    """Representative grids for ``world``: the 5-D one (pp up to 8, x=y=z=2, dp the rest), pure
    data parallel, and a two-axis pp x x grid (x up to 8 inside a node, pp the rest)."""
    out = []
    if world >= 8:
        pp = min(8, world // 8)
        out.append(("5-D", dict(pp=pp, x=2, y=2, z=2)))
    out.append(("dp", dict(dp=world)))
    x = min(8, world // 2)
    out.append(("pp x x", dict(pp=world // x, x=x)))
    if world in ISSUE_GRIDS:
        out.append(("issue", ISSUE_GRIDS[world]))
    return out


def label(sizes: dict[str, int]) -> str:
    return "x".join(f"{a}{sizes[a]}" for a in AXES if sizes[a] > 1) or "1"


def old_figures(sizes: dict[str, int]) -> tuple[int, int]:
    """(new_group calls, enumeration steps) of the code before e3e2f64 on any rank: one call per
    distinct membership but the world; for each combination, every rank's group enumerated."""
    world = math.prod(sizes.values())
    reduced = {tuple(a for a in axes if sizes[a] > 1) for axes in COMBOS}
    distinct = sum(world // math.prod(sizes[a] for a in r) for r in reduced)
    steps = sum(world * math.prod(sizes[a] for a in axes) for axes in COMBOS)
    return distinct - (1 if world > 1 else 0), steps


def measure(sizes: dict[str, int], rank: int, splits: bool) -> tuple[int, int, float, float]:
    """(calls, groups this rank is in, CPU seconds, wall seconds) of ``build_groups`` for ``rank`` in a fresh fake
    world. ``splits``: as on a device-bound NCCL world, with ``split_group`` stubbed (counted)."""
    world = math.prod(sizes.values())
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        if splits:
            def stub(*, split_ranks: list[list[int]], timeout: timedelta, group_desc: str) -> Any:
                return object()

            with mock.patch.object(grid_mod, "_splits_world", return_value=True), \
                    mock.patch.object(dist, "split_group", side_effect=stub) as spy:
                start, cpu = time.perf_counter(), time.process_time()
                groups = build_groups(sizes, rank, TIMEOUT, reuse_world=True)
        else:
            with mock.patch.object(dist, "new_group", wraps=dist.new_group) as spy:
                start, cpu = time.perf_counter(), time.process_time()
                groups = build_groups(sizes, rank, TIMEOUT, reuse_world=True)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return spy.call_count, len({id(g) for g in groups.values()}), cpu, wall
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 256, 1024, 4096, 16384])
    args = parser.parse_args()
    rows = []
    worlds = sorted(set(args.worlds) | {w for w in ISSUE_GRIDS if w <= max(args.worlds)})
    for world in worlds:
        for kind, kwargs in grids(world):
            sizes = resolve_sizes(world, **kwargs)
            last = world - 1
            calls0, mine0, cpu0, wall0 = measure(sizes, 0, splits=False)
            calls1, mine1, cpu1, wall1 = measure(sizes, last, splits=False)
            split0 = measure(sizes, 0, splits=True)[0]
            split1 = measure(sizes, last, splits=True)[0]
            old_calls, old_steps = old_figures(sizes)
            rows.append([f"{world:,}", f"{label(sizes)} ({kind})", f"{calls0:,} / {calls1:,}",
                         f"{split0} / {split1}", f"{mine0} / {mine1}",
                         f"{cpu0:.2f} / {wall0:.2f}", f"{cpu1:.2f} / {wall1:.2f}",
                         f"{old_calls:,}", f"{old_steps:,}"])
            print(f"done world {world} {label(sizes)}", file=sys.stderr, flush=True)
    print(table("Group set-up per rank on the fake backend (rank 0 / last rank)",
                ["world", "grid", "new_group calls", "split_group calls (NCCL, device-bound)",
                 "groups it is in", "s rank 0 (CPU / wall)", "s last rank (CPU / wall)", "old new_group calls",
                 "old enumeration steps (sum world x group size)"], rows))
    print("\nnew_group calls: every rank makes the same ones in the same order (size-1 groups: only its "
          "own); the all-ranks group is the default group. The old code's calls and steps are analytic.")


if __name__ == "__main__":
    main()
