"""``autopar plan --dry-run``: the real set-up of a few ranks of a cluster-size job, in one process.

``autopar plan`` counts shapes; this builds what a rank would really hold, so the layouts,
the pipeline split and the process groups are autopar's own, not a model of them. For each
chosen rank (default: rank 0 and the last rank, i.e. the first and last pipeline stage):

* the world is torch's ``fake`` backend (every collective returns at once) over an in-process
  ``HashStore`` (autopar's diagnostics publish to the store, which ``FakeStore`` refuses), and
  ``autopar.init`` lays the grid over it with the real ``build_groups``, as on a world made
  before ``init`` (so the all-ranks group is a ``new_group`` too): set-up time and the
  ``new_group`` calls it made are reported;
* the model is built under ``torch.device("meta")`` and ``auto_parallelize``, so every shard has
  exactly the shape the real run gives it, and layers that stay whole are the real run's;
* the meta tensors are then swapped for zero-stride stand-ins on the CPU (one element each,
  expanded to the shape, no storage), because the pipeline's split cannot run on meta: its
  trace runs the glue (HF's mask code calls ``.item()``) on real tensors of the grid's device
  and the units on fake tensors of that device, and autopar's autocast query
  (``intra_layer.comm._autocast_dtype``) raises for the "meta" device type;
* ``autopar.parallelize`` then makes the real engine: with pp > 1 the traced, cost-balanced
  split (``pipeline.split``) and ``place_units`` decide the stage, and the gradient buckets
  (real CPU buffers of this rank's gradient size) and ZeRO shards are the real ones.

Figures per rank and step (fp32): parameters and gradients as ``memory_report`` sees them,
AdamW state as two fp32 moments of every tensor the optimizer steps (its ZeRO shards;
``memory_report`` shows 0 until the first step creates the state), and activations and
communication by axis from ``plan.predict`` over the shapes of this rank's stage. The held
parameters are checked against ``plan``'s count of the same stage and its even-split estimate.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..engine import parallelize
from ..intra_layer.auto import auto_parallelize, plan as layer_plan
from ..intra_layer.layers import ShardedModule, spec_of
from ..offload.memory import MemoryReport, memory_report
from ..pipeline import UntraceableModel
from ..runtime import state
from ..runtime.grid import AXES, coords_of, resolve_sizes
from . import models, plan

GIB = 2.0 ** 30


@dataclasses.dataclass(frozen=True)
class RankFigures:
    """What one rank holds and sends per step, and how long its set-up took."""

    rank: int
    coords: dict[str, int]
    units: list[str]               # this rank's pipeline units, in call order ([] for pp=1: all)
    held: list[str]                # qualified names of the parameters it holds and trains
    params: int                    # elements of those parameters
    grads: int                     # bytes the gradient buckets hold at the end of backward
    adamw: int                     # bytes, 2 fp32 moments per element the optimizer steps
    seq_len: int
    analytic: dict[str, float]     # plan.predict over this stage's shapes
    even: dict[str, float]         # plan.predict under the even-split assumption (busiest stage)
    report: MemoryReport
    whole: list[str]               # layers left whole: "<name> (<type> <shape>): <why>"
    setup_s: float                 # autopar.init: build_groups on the fake backend
    groups_made: int               # new_group calls (the same on every rank)
    groups_held: int               # distinct groups this rank belongs to
    build_s: float
    parallelize_s: float


def _stand_ins(model: nn.Module) -> None:
    """Swap every meta tensor for a zero-stride CPU stand-in of its shape, dtype and tags (shared
    tensors share one), so the pipeline's trace can run (see the module docstring)."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for slot in (module._parameters, module._buffers):
            for name, t in slot.items():
                if t is None:
                    continue
                if id(t) not in made:
                    stand_in = torch.zeros((), dtype=t.dtype).expand(t.shape)
                    if isinstance(t, nn.Parameter):
                        stand_in = nn.Parameter(stand_in, t.requires_grad)
                        stand_in.__dict__.update(t.__dict__)  # shard spec and gradient tags
                    made[id(t)] = stand_in
                slot[name] = made[id(t)]


def _whole(model: nn.Module, sizes: dict[str, int]) -> list[str]:
    """The parallel layers ``auto_parallelize`` left whole, by name, with ``plan``'s reason (a
    layer that plans a layout yet stays whole was untied from one with another layout). None on
    x = y = z = 1, where no layer is sharded."""
    if set(sizes.values()) == {1}:
        return []
    found = []
    for name, module in model.named_modules():
        if isinstance(module, ShardedModule) and "weight" in module._parameters and spec_of(module.weight) is None:
            why = layer_plan(module, sizes, 0)[1] or "tied to a layer with another layout, or not in the block"
            found.append(f"{name} ({type(module).__name__} {tuple(module.weight.shape)}): {why}")
    return found


def dry_run_rank(world: int, grid: dict[str, int], rank: int, build: Callable[[], nn.Module], *,
                 global_batch: int, seq_len: int | None, microbatches: int, zero: int) -> RankFigures:
    """Play ``rank`` of a ``world``-rank job on the fake backend; see the module docstring."""
    if dist.is_initialized():
        raise RuntimeError("autopar plan --dry-run makes its own fake world, but torch.distributed is "
                           "already initialised in this process")
    sizes = resolve_sizes(world, **grid)
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 - registers the "fake" backend

    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world)
    try:
        before = dist.distributed_c10d._world.group_count
        start = time.perf_counter()
        g = state.init(**sizes, device="cpu")
        setup_s = time.perf_counter() - start
        groups_made = dist.distributed_c10d._world.group_count - before
        with torch.device("meta"):  # plan's shapes come from the serial model, independently
            serial = build()
        full = plan.shape_of(serial, seq_len)
        start = time.perf_counter()
        with torch.device("meta"), auto_parallelize():
            model = build()
        build_s = time.perf_counter() - start
        whole = _whole(model, {a: sizes[a] for a in ("x", "y", "z")})
        _stand_ins(model)
        start = time.perf_counter()
        sample = models.make_batch(model, microbatches, seq=full.seq_len) if sizes["pp"] > 1 else None
        engine = parallelize(model, optimizer=lambda params: torch.optim.AdamW(params), zero=zero,
                             num_microbatches=microbatches, sample_batch=sample)
        parallelize_s = time.perf_counter() - start
        ids = {id(p) for p in engine.params}
        held = [n for n, p in model.named_parameters() if id(p) in ids]
        pipe, stage = engine.pipeline, g.coords["pp"]
        units = [] if pipe is None else [pipe.units.names[u] for u in next(iter(pipe.plans.values())).flow.order
                                          if pipe.chunk_of[u] % sizes["pp"] == stage]
        report = memory_report(engine)
        figures = RankFigures(
            rank=rank, coords=coords_of(rank, sizes), units=units, held=held, seq_len=full.seq_len,
            params=sum(p.numel() for p in engine.params), grads=engine.dp.held_grad_bytes(),
            adamw=2 * sum(p.numel() * 4 for p in engine.dp.optimizer_params),
            analytic=plan.predict(plan.shape_of(serial, seq_len, held=set(held)), sizes, global_batch,
                                  microbatches, stage=stage),
            even=plan.predict(full, sizes, global_batch, microbatches),
            report=report, whole=whole, setup_s=setup_s, groups_made=groups_made,
            groups_held=len({id(x) for x in g._groups.values()}), build_s=build_s, parallelize_s=parallelize_s)
    finally:
        state.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()
    return figures


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (bench/tables.py's layout without its title; autopar does not
    import from bench/)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _versus(value: float, reference: float) -> str:
    """``value`` against ``reference``: "=" when equal to 0.01 %, else the signed difference."""
    if reference == value or reference and abs(value / reference - 1) < 1e-4:
        return "="
    return f"{(value / reference - 1) * 100:+.2f} %" if reference else f"{value:.0f} vs 0"


def _units(units: list[str]) -> str:
    if not units:
        return "all (pp=1)"
    return ", ".join(units) if len(units) <= 3 else f"{units[0]} … {units[-1]} ({len(units)})"


HEADER = ["rank", "pp,dp,z,y,x", "stage units", "params (M)", "weights", "grads", "AdamW", "activ.*", "memory",
          "comm x/y*", "z*", "dp*", "pp*", "vs plan (stage)", "vs plan (even)", "vs memory_report",
          "set-up s", "groups"]


def _row(f: RankFigures) -> list[str]:
    a, gib = f.analytic, lambda v: f"{v / GIB:.3f}"
    weights = 4 * f.params
    memory = weights + f.grads + f.adamw + a["activations"]
    report = f.report.on_device
    grads = _versus(f.grads, report["gradients"]) if report["gradients"] else "0 until a step"
    checks = f"params {_versus(weights, report['parameters'])}, grads {grads}"
    return [str(f.rank), ",".join(str(f.coords[x]) for x in AXES), _units(f.units), f"{f.params / 1e6:.2f}",
            gib(weights), gib(f.grads), gib(f.adamw), gib(a["activations"]), gib(memory),
            *(gib(a[f"comm {k}"]) for k in ("x/y", "z", "dp", "pp")), _versus(f.params, a["params"]),
            _versus(f.params, f.even["params"]), checks, f"{f.setup_s:.2f}", f"{f.groups_made:,} ({f.groups_held})"]


def format_run(title: str, sizes: dict[str, int], figures: list[RankFigures], zero: int) -> str:
    """The run's table and what it rests on."""
    grid = " x ".join(f"{a}={sizes[a]}" for a in AXES)
    notes = [
        f"{title} on {math.prod(sizes.values()):,} ranks, {grid}; fp32, AdamW"
        + (f" with ZeRO-{zero} shards" if zero else "") + "; GiB per rank and step.",
        "",
        markdown_table(HEADER, [_row(f) for f in figures]),
        "",
        "* plan's estimates over this rank's own stage (activations: Korthikanti et al.; comm: bytes sent). "
        "Everything else is what the real set-up holds: shards from auto_parallelize on meta, "
        + ("the stage from the traced cost-balanced split (pipeline.split, place_units; it cannot trace meta "
           "tensors, so it ran on zero-stride CPU stand-ins of the same shapes), " if sizes["pp"] > 1 else "")
        + "gradients as the engine's buckets hold them at the end of backward (`held_grad_bytes`), AdamW as "
        "2 fp32 moments of what the optimizer steps. memory_report reads gradients (without ZeRO) and "
        "optimizer state at a step, so before one it shows 0 for them.",
        "vs plan: held parameters against plan's count of the same stage, and against plan's even-split "
        "estimate of the busiest stage. groups: new_group calls at set-up (every rank makes the same), "
        "in brackets the distinct groups this rank is in; autopar.init joins the fake world as a world "
        "made before it, so the all-ranks group is one call more than in a job whose world autopar makes.",
    ]
    for f in figures:
        timing = f"rank {f.rank}: model built on meta in {f.build_s:.2f} s, parallelize {f.parallelize_s:.2f} s"
        notes.append(timing + ("; layers left whole: " + "; ".join(f.whole) if f.whole else "; no layer left whole"))
    return "\n".join(notes)


def main(args: argparse.Namespace) -> int:
    """``autopar plan --dry-run``: one table for ``args.ranks`` of ``args.world`` on ``args.grid``."""
    if not args.grid:
        raise ValueError("--dry-run builds one grid: pass --grid, e.g. --grid pp=8,x=2,y=2,z=2 (dp is inferred)")
    sizes = resolve_sizes(args.world, **args.grid)
    ranks = args.ranks if args.ranks is not None else sorted({0, args.world - 1})
    outside = [r for r in ranks if not 0 <= r < args.world]
    if outside:
        raise ValueError(f"--ranks {outside}: a world of {args.world} ranks has ranks 0..{args.world - 1}")
    microbatches = args.microbatches or sizes["pp"]
    try:
        figures = [dry_run_rank(args.world, sizes, r, lambda: plan.build_model(args), global_batch=args.global_batch,
                                seq_len=args.seq_len, microbatches=microbatches, zero=args.zero) for r in ranks]
    except UntraceableModel as e:  # the CLI reports ValueErrors as one line
        raise ValueError(f"the pipeline split cannot trace this model, so the dry run cannot place rank stages: {e}. "
                         "`autopar plan` without --dry-run gives the even-split estimate") from e
    title = (f"{args.factory or args.model}: global batch {args.global_batch} x "
             f"{figures[0].seq_len} tokens, {microbatches} microbatches")
    print(format_run(title, sizes, figures, args.zero))
    return 0
