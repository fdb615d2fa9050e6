"""The planner (issue 16.3) against measured step times: the 8-rank composition grids.

Measures the step time of ``bench_composition.py``'s grids (its zero=0 cases: same GPT-2, same
batch, microbatches = pp) on 8 gloo ranks, without its byte counter (which wraps
``dist.isend``, and ``batch_isend_irecv`` refuses wrapped ops), and sets it next to
``autopar.cli.cost``'s prediction for this machine as calibrated by ``calibrate`` (a matmul
and a 2-rank gloo all-reduce, run first). Step time: median over ``--steps`` of the slowest
rank's step, after one warm-up step. Prints the table, the Spearman rank correlation and the
median relative error.

    OMP_NUM_THREADS=1 python bench/bench_planner.py [--steps 3]
"""
from __future__ import annotations

import argparse
import os
import queue
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import autopar
import bench_composition as bc  # bench/ is on sys.path: the scripts run as files
from autopar.cli import cost
from autopar.cli.plan import shape_of
from autopar.runtime.grid import resolve_sizes
from tables import table

CASES = [(name, grid) for name, grid, zero in bc.CASES if zero == 0]


def _rank(rank: int, args: argparse.Namespace, port: int, out: "mp.Queue") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=bc.WORLD,
                            timeout=timedelta(seconds=600))
    for name, grid_kw in CASES:
        grid = autopar.init(**grid_kw)
        with autopar.auto_parallelize():
            model = bc._gpt2(args.layers, args.seq)
        engine = autopar.parallelize(model, optimizer=bc._adamw, num_microbatches=grid.sizes["pp"], bucket_mb=2.0)
        engine.step(autopar.shard_batch(bc._batch(args.batch, args.seq, 0)))  # warm-up: trace, plan, allocate
        times = []
        for s in range(args.steps):
            batch = autopar.shard_batch(bc._batch(args.batch, args.seq, 1 + s))
            dist.barrier()
            t0 = time.perf_counter()
            engine.step(batch)
            times.append(time.perf_counter() - t0)
        out.put((name, rank, times))
        del engine, model
        autopar.destroy()
    dist.destroy_process_group()


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks (ties averaged)."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    hw = cost.calibrate(bc.WORLD)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = bc._free_port()
    procs = [ctx.Process(target=_rank, args=(r, args, port, out)) for r in range(bc.WORLD)]
    for proc in procs:
        proc.start()
    got: dict[str, dict[int, list[float]]] = {name: {} for name, _ in CASES}
    while sum(map(len, got.values())) < bc.WORLD * len(CASES):
        try:
            name, rank, times = out.get(timeout=5)
            got[name][rank] = times
        except queue.Empty:
            if any(proc.exitcode not in (None, 0) for proc in procs):
                raise SystemExit("a rank failed; see its traceback above")
    for proc in procs:
        proc.join()
    with torch.device("meta"):
        shape = shape_of(bc._gpt2(args.layers, args.seq), args.seq)
    rows, measured, predicted = [], [], []
    for name, grid_kw in CASES:
        sizes = resolve_sizes(bc.WORLD, **grid_kw)
        c = cost.step_cost(shape, sizes, args.batch, sizes["pp"], hw)
        slowest = [max(got[name][r][s] for r in got[name]) for s in range(args.steps)]
        m = statistics.median(slowest)
        measured.append(m)
        predicted.append(c.step)
        rows.append([name, f"{m * 1e3:.0f}", f"{c.step * 1e3:.0f}", f"{c.step / m:.2f}", f"{c.compute * 1e3:.0f}",
                     f"{c.bubble * 1e3:.0f}", *(f"{c.comm[a] * 1e3:.0f}" for a in ("x", "y", "z", "dp", "pp")),
                     f"{c.memory / 2 ** 20:.0f}"])
    errors = [abs(pr - me) / me for pr, me in zip(predicted, measured)]
    scale = statistics.median(me / pr for pr, me in zip(predicted, measured))  # one factor for all grids
    shape_errors = [abs(scale * pr - me) / me for pr, me in zip(predicted, measured)]
    print(f"{bc.WORLD} gloo ranks on {os.cpu_count()} cores, GPT-2 {args.layers} layers x 256, seq {args.seq}, "
          f"global batch {args.batch}, microbatches = pp, 1f1b, AdamW; median of {args.steps} steps after 1\n"
          f"calibrated: {hw.flops / 1e9:.3g} GFLOP/s per rank, {hw.intra_bw / 1e9:.3g} GB/s, "
          f"{hw.latency * 1e6:.0f} us per call\n")
    print(table("Predicted vs measured step time (ms; prediction's parts: compute, bubble, exposed comm by axis)",
                ["grid", "measured", "predicted", "pred/meas", "compute", "bubble", "x", "y", "z", "dp", "pp",
                 "memory (MiB)"], rows))
    print(f"\nSpearman rank correlation {spearman(predicted, measured):.2f}; median relative error "
          f"{statistics.median(errors):.0%} (max {max(errors):.0%}); after one common factor x{scale:.2f} "
          f"(measured / predicted, median), {statistics.median(shape_errors):.0%} (max {max(shape_errors):.0%})"
          "\norder by measured: "
          + ", ".join(name for _, name in sorted(zip(measured, (n for n, _ in CASES))))
          + "; by predicted: " + ", ".join(name for _, name in sorted(zip(predicted, (n for n, _ in CASES)))))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
