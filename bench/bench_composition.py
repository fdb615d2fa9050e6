"""The 5D composition on 8 gloo ranks: memory and communication per rank, against the ideal.

Mirrors the grid matrix of ``tests/test_composition.py`` (pp2xdp2xx2, pp2xy2xz2, dp2xx2xz2,
pp2xdp2xz2, x2xy2xz2, pp4xx2, dp8, and pp2xdp2xx2 under zero=1 and zero=2) with a GPT-2 built
from a small config (vocab 2048, 256 wide, seq 64) under ``autopar.auto_parallelize()``, AdamW,
one warm-up step (it traces the pipeline and plans the buckets) and ``--steps`` counted ones.
The 8 ranks are spawned by the script and run every grid in turn, so imports happen once.

1. Memory: the max over ranks of ``autopar.memory_report`` parameter / gradient / optimizer bytes,
   against the ideal, with P the serial model's bytes (tied weights once):
       parameters, gradients:  P / (pp*z*y*x)          (dp replicates; z shards like ZeRO-3)
       gradients, zero=2:      P / (pp*z*y*x*dp)
       optimizer (AdamW, 2 fp32 states): 2P / (pp*z*y*x), divided by dp as well under zero>=1.
   Below it, one line per grid splits the parameter excess of the fullest rank into what is
   replicated over the tensor-parallel axes (LayerNorms, biases), pipeline stage imbalance (the
   stage's share beyond P/pp, including GPT-2's tied embedding, which lives on the first and the
   last stage) and ZeRO padding. A third table gives the bytes the rank really holds where they
   differ from the report (ZeRO keeps full flat parameters, and full gradient buckets during backward).
2. Communication: bytes sent per rank per step (max / mean over ranks), split by the process
   group each call went over, named by its grid axes (``bench/comm_count.py``: ring formulas,
   p2p counted at the sender). Next to it the gradient buckets' measured bytes against the
   analytic all-reduce optimum, sum over buckets of 2(n-1)/n x the bucket's gradient bytes
   (n = its group size). ZeRO-1 adds a parameter all-gather (1.5x); ZeRO-2 is reduce-scatter +
   all-gather (1.0x).

    OMP_NUM_THREADS=1 python bench/bench_composition.py [--layers 8] [--steps 2] [--batch 16]
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import queue
import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import autopar
from autopar.runtime.grid import AXES, TP_AXES
from autopar.runtime.params import is_norm_duplicate, shard_axes
from comm_count import ByteCounter  # bench/ is on sys.path: the scripts run as files
from tables import table as _table

CASES = [  # (name, grid, zero)
    ("pp2xdp2xx2", dict(pp=2, dp=2, x=2), 0),
    ("pp2xy2xz2", dict(pp=2, y=2, z=2), 0),
    ("dp2xx2xz2", dict(dp=2, x=2, z=2), 0),
    ("pp2xdp2xz2", dict(pp=2, dp=2, z=2), 0),
    ("x2xy2xz2", dict(x=2, y=2, z=2), 0),
    ("pp4xx2", dict(pp=4, x=2), 0),
    ("dp8", dict(dp=8), 0),
    ("pp2xdp2xx2 zero=1", dict(pp=2, dp=2, x=2), 1),
    ("pp2xdp2xx2 zero=2", dict(pp=2, dp=2, x=2), 2),
]
WORLD = 8
MiB = 2 ** 20


def _gpt2(layers: int, seq: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=2048, n_positions=seq, n_embd=256, n_layer=layers, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _batch(n: int, seq: int, seed: int) -> dict:
    ids = torch.randint(0, 2048, (n, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-4)


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``: views into one flat buffer (ZeRO,
    gradient buckets) count once, with the buffer's padding."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _labeller(grid: autopar.Grid):
    """id(group) -> its axes, e.g. "dp,z". A group is named by the axes of size > 1 it spans,
    found by identity among the grid's groups; groups made outside the grid (the pipeline's
    tied-weight group) by membership."""
    big = [a for a in AXES if grid.sizes[a] > 1]
    named: dict[int, str] = {}
    members: dict[tuple[int, ...], str] = {}
    for n in range(len(big), 0, -1):  # smaller combinations last, so they win for equal groups
        for axes in itertools.combinations(big, n):
            named[id(grid.group(*axes))] = ",".join(axes)
            members[grid.ranks(*axes)] = ",".join(axes)
    pp_line = set(grid.ranks("pp"))

    def label(group: Any) -> str:
        if id(group) in named:
            return named[id(group)]
        group = dist.group.WORLD if group is None else group
        if id(group) in named:
            return named[id(group)]
        ranks = tuple(sorted(dist.get_process_group_ranks(group)))
        if set(ranks) <= pp_line:
            return "pp tied"
        return members.get(ranks, "other") + " (own group)"
    return label


def _case(grid_kw: dict, zero: int, args: argparse.Namespace) -> dict:
    """Runs on every rank: build, warm up, count ``args.steps`` steps, measure."""
    grid = autopar.init(**grid_kw)
    with autopar.auto_parallelize():
        model = _gpt2(args.layers, args.seq)
    engine = autopar.parallelize(model, optimizer=_adamw, num_microbatches=grid.sizes["pp"], zero=zero,
                                 bucket_mb=args.bucket_mb)
    engine.step(autopar.shard_batch(_batch(args.batch, args.seq, 0)))  # warm-up: trace, plan, allocate
    dp = engine.dp
    peak_grads = [0]
    finish, launch, after_step = dp.finish, dp._launch, dp.after_step

    def measured_finish(*a, **kw):  # after backward, before any bucket is freed: the gradient peak
        grads = [p.grad for p in engine.params] + [p.grad for p in dp.optimizer_params]
        peak_grads[0] = max(peak_grads[0], _storage_bytes(grads))
        finish(*a, **kw)

    with ByteCounter() as counter:
        def tagged_launch(bucket):
            with counter.tag("buckets"):
                launch(bucket)

        def tagged_after_step():
            with counter.tag("buckets"):
                after_step()
        dp.finish, dp._launch, dp.after_step = measured_finish, tagged_launch, tagged_after_step
        for s in range(args.steps):
            engine.step(autopar.shard_batch(_batch(args.batch, args.seq, 1 + s)))
    report = autopar.memory_report(engine).on_device
    label = _labeller(grid)
    comm: dict[str, float] = {}
    for gid, sent in counter.by_group.items():
        key = label(counter.groups[gid])
        comm[key] = comm.get(key, 0.0) + sent / args.steps
    optimum = sum(2 * (b.world - 1) / b.world * 4 * sum(p.numel() for p in b.params) for b in dp.buckets)

    def tp_replicas(p: torch.Tensor) -> int:
        return math.prod(grid.sizes[a] for a in TP_AXES if a not in shard_axes(p))
    share = sum(4 * p.numel() / tp_replicas(p) for p in engine.params)
    result = {
        "report": report,
        "held_params": _storage_bytes(list(engine.params) + list(dp.optimizer_params)),
        "held_grads": peak_grads[0],
        "replicated": sum(4 * p.numel() * (1 - 1 / tp_replicas(p)) for p in engine.params),
        "share": share,
        "tied": sum(4 * p.numel() / tp_replicas(p) for p in engine.params if is_norm_duplicate(p)),
        "stage": grid.coords["pp"],
        "comm": comm,
        "buckets": counter.by_tag.get("buckets", 0.0) / args.steps,
        "optimum": optimum,
    }
    autopar.destroy()
    return result


def _rank(rank: int, args: argparse.Namespace, port: int, out: "mp.Queue") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=600))
    for i, (_, grid_kw, zero) in enumerate(CASES):
        if args.only and CASES[i][0] not in args.only:
            continue
        t0 = time.perf_counter()
        result = _case(grid_kw, zero, args)
        result["seconds"] = time.perf_counter() - t0
        out.put((i, rank, result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mib(b: float) -> str:
    return f"{b / MiB:.3f}"


def _memory(results: dict[int, list[dict]], serial: int) -> None:
    rows, notes, held_rows = [], [], []
    for i, ranks in results.items():
        name, g, zero = CASES[i]
        sizes = {a: g.get(a, 1) for a in AXES}
        model = sizes["pp"] * sizes["z"] * sizes["y"] * sizes["x"]
        ideal = {"parameters": serial / model,
                 "gradients": serial / model / (sizes["dp"] if zero == 2 else 1),
                 "optimizer_state": 2 * serial / model / (sizes["dp"] if zero else 1)}
        row = [name]
        for cat in ("parameters", "gradients", "optimizer_state"):
            worst = max(r["report"][cat] for r in ranks)
            row += [_mib(worst), _mib(ideal[cat]), f"{worst / ideal[cat]:.2f}"]
        rows.append(row)
        # The fullest rank by the bytes it really holds explains the parameter excess.
        rank = max(range(len(ranks)), key=lambda k: ranks[k]["held_params"])
        r = ranks[rank]
        # The stages together hold the tied embedding twice; on average that is copy / pp per rank.
        copy = max(q["tied"] for q in ranks) / sizes["pp"]
        imbalance = r["share"] - ideal["parameters"] - copy
        padding = r["held_params"] - (r["share"] + r["replicated"])
        notes.append(f"- {name}: fullest rank {rank} (pp stage {r['stage']}) holds {_mib(r['held_params'])} = "
                     f"ideal {_mib(ideal['parameters'])} + {_mib(r['replicated'])} replicated over the TP axes "
                     f"(LayerNorms, biases) + {_mib(copy)} tied embedding's second copy (averaged over the "
                     f"stages) + {_mib(imbalance)} stage imbalance"
                     + (f" + {_mib(padding)} ZeRO/bucket padding" if abs(padding) > 0.5 else ""))
        rep_p = max(r["report"]["parameters"] for r in ranks)
        rep_g = max(r["report"]["gradients"] for r in ranks)
        hp, hg = max(r["held_params"] for r in ranks), max(r["held_grads"] for r in ranks)
        if abs(hp - rep_p) > 0.01 * hp or abs(hg - rep_g) > 0.01 * hg:
            held_rows.append([name, _mib(rep_p), _mib(hp), _mib(rep_g), _mib(hg)])
    print(_table("Memory per rank (MiB, max over ranks, autopar.memory_report) against the ideal",
                 ["grid", "params", "ideal", "ratio", "grads", "ideal", "ratio", "AdamW state", "ideal", "ratio"],
                 rows))
    print("\nWhere the parameter excess goes (MiB):")
    print("\n".join(notes) + "\n")
    if held_rows:
        print(_table("memory_report against what the fullest rank holds (MiB; gradients: peak, after backward)",
                     ["grid", "params reported", "params held", "grads reported", "grads held (peak)"], held_rows))
        print("(under ZeRO the report counts this rank's optimizer shard as its parameters and gradients; the "
              "rank still holds the full flat parameter buffer, and the full gradient buckets until the reduction)\n")


def _communication(results: dict[int, list[dict]]) -> None:
    columns = ["pp", "pp tied", "dp", "z", "y", "x"]
    rows, combined_notes = [], []
    for i, ranks in results.items():
        name = CASES[i][0]
        labels = sorted({k for r in ranks for k in r["comm"]})
        extra = [k for k in labels if k not in columns]

        def cell(keys: list[str]) -> str:
            per_rank = [sum(r["comm"].get(k, 0.0) for k in keys) for r in ranks]
            if not any(per_rank):
                return "-"
            return f"{_mib(max(per_rank))} / {_mib(sum(per_rank) / len(per_rank))}"
        total = cell(labels)
        bucket = max(r["buckets"] for r in ranks)
        optimum = max(r["optimum"] for r in ranks)
        ratio = max((r["buckets"] / r["optimum"]) if r["optimum"] else 0.0 for r in ranks)
        rows.append([name] + [cell([c]) for c in columns] + [cell(extra), total, _mib(bucket), _mib(optimum),
                                                              f"{ratio:.2f}" if optimum else "-"])
        if extra:
            combined_notes.append(f"- {name}: " + "; ".join(
                f"{k}: {max(r['comm'].get(k, 0.0) for r in ranks):.0f} B max" for k in extra))
    print(_table("Bytes sent per rank per step (MiB, max / mean over ranks), by the group's axes",
                 ["grid"] + columns + ["combined groups", "total", "grad buckets (measured, max)",
                                       "bucket all-reduce optimum (max)", "measured / optimum (max)"], rows))
    print("\nCombined groups, bytes per step (the global loss over pp,dp,z; the first steps' bucket re-plan "
          "broadcast over dp,z,y,x; clipping, when on):")
    print("\n".join(combined_notes))
    print("\npp: activations and their gradients, point to point, plus the clipping/loss scalars over pp; "
          "pp tied: the tied embedding's gradient summed over the first and last stage. Grad buckets are "
          "the dp (or dp,z / z) reductions, ZeRO all-gathers included: 1.5x the optimum under zero=1 and "
          "1.0x under zero=2 are the expected ratios.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--steps", type=int, default=2, help="counted steps after one warm-up")
    parser.add_argument("--bucket-mb", type=float, default=2.0)
    parser.add_argument("--only", nargs="+", choices=[c[0] for c in CASES], help="run these grids only")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, args, port, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    wanted = [i for i, c in enumerate(CASES) if not args.only or c[0] in args.only]
    got: dict[int, dict[int, dict]] = {i: {} for i in wanted}
    while sum(len(v) for v in got.values()) < WORLD * len(wanted):
        try:
            i, rank, result = out.get(timeout=5)
            got[i][rank] = result
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise SystemExit(f"a rank failed (exit codes {dead}); see its traceback above")
    for p in procs:
        p.join()
    results = {i: [got[i][r] for r in range(WORLD)] for i in wanted}
    serial_model = _gpt2(args.layers, args.seq)
    serial = 4 * sum(p.numel() for p in serial_model.parameters())  # parameters() yields tied weights once
    print(f"{WORLD} gloo ranks, GPT-2 {args.layers} layers x 256 wide, vocab 2048, seq {args.seq} "
          f"({serial / 4 / 1e6:.2f} M params, {serial / MiB:.1f} MiB fp32), global batch {args.batch}, "
          f"microbatches = pp, AdamW, bucket {args.bucket_mb} MiB; 1 warm-up + {args.steps} counted step(s)\n")
    _memory(results, serial)
    _communication(results)
    per_case = ", ".join(f"{CASES[i][0]} {max(r['seconds'] for r in rs):.0f} s" for i, rs in results.items())
    print(f"\nwall time {time.perf_counter() - start:.0f} s ({per_case})")


if __name__ == "__main__":
    main()
