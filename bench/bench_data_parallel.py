"""Data-parallel step time against PyTorch DDP, overlap, and communication bytes per rank.

Runs N gloo ranks on this machine (default 4) with an MLP, the same bucket size for autopar and
DDP, AdamW, and prints three tables:

1. step time of autopar (zero=0/1/2) and DDP, and autopar / DDP as a ratio;
2. how much of the gradient reduction is hidden behind backward: measured as the time the step
   still waits for reductions after backward (autopar's ``finish()``) against the time the same
   buckets take to reduce on their own, and, for both libraries, as
   (compute-only step + reduction alone - step) / reduction alone;
3. bytes each rank sends per step, counted by wrapping the collectives (ring algorithm:
   all-reduce 2(n-1)/n x bytes, reduce-scatter and all-gather (n-1)/n x bytes), against the
   analytic ring all-reduce of the gradients, 2(n-1)/n x parameter bytes.

    python bench/bench_data_parallel.py [--ranks 4] [--width 512] [--layers 8] [--bucket-mb 2]

On a small shared CPU machine the timings are noisy and gloo's communication threads compete
with compute for the same cores, so overlap is bounded by the cores, not by the library.
"""
from __future__ import annotations

import argparse
import os
import queue
import socket
import statistics
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import autopar
from comm_count import ByteCounter  # bench/ is on sys.path: the scripts run as files
from tables import table as _table


def _model(width: int, layers: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(width, 1))


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4)


def _batch(args: argparse.Namespace, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(args.batch, args.width, generator=g), torch.randn(args.batch, 1, generator=g)


def _mse(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out, batch[1])


def _time_interleaved(steps: dict[str, Callable[[int], None]], args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per call of each variant after warm-up. The variants take turns step by
    step (every rank starting each call together), so a change in machine load hits them all
    alike instead of whichever happened to run last."""
    for i in range(args.warmup):
        for step in steps.values():
            step(i)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps):
        for name, step in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            step(args.warmup + i)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _plain_step(model: torch.nn.Module, rank_batch: Callable, global_loss: bool = False) -> Callable[[int], None]:
    """A hand-written step (for DDP, or the model alone); ``global_loss`` adds the one thing
    ``Engine.step`` does on top: return the global mean loss (a 4-byte all-reduce, a host sync)."""
    opt = _adamw(model.parameters())

    def step(i: int) -> None:
        x, y = rank_batch(i)
        loss = _mse(model(x), (x, y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if global_loss:
            total = loss.detach() / dist.get_world_size()
            dist.all_reduce(total)
            float(total)
    return step


def _count_ddp_bytes(model: torch.nn.Module, step: Callable[[int], None]) -> float:
    counter = ByteCounter()

    def counting_hook(state, bucket):  # no annotations: DDP checks them against real types
        n = dist.get_world_size()
        counter.sent += 2 * (n - 1) / n * bucket.buffer().numel() * bucket.buffer().element_size()
        work = dist.all_reduce(bucket.buffer().div_(n), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])
    model.register_comm_hook(None, counting_hook)
    step(0)
    return counter.sent


def _rank(rank: int, args: argparse.Namespace, port: int, out: "mp.Queue") -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.ranks, timeout=timedelta(seconds=300))
    autopar.init(dp=args.ranks)

    def rank_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _batch(args, i)  # the same data everywhere: the work per step is what counts

    ddp_models = [DDP(_model(args.width, args.layers), bucket_cap_mb=args.bucket_mb) for _ in range(2)]
    engines = {zero: autopar.parallelize(_model(args.width, args.layers), optimizer=_adamw, loss_fn=_mse,
                                         bucket_mb=args.bucket_mb, zero=zero) for zero in (0, 1, 2)}
    waits: list[float] = []
    finish = engines[0].dp.finish

    def timed_finish(mean_of: int = 1) -> None:  # what is still waited for after backward
        t0 = time.perf_counter()
        finish(mean_of)
        waits.append(time.perf_counter() - t0)
    engines[0].dp.finish = timed_finish
    buckets = engines[0].dp.buckets

    def reduce_alone(_: int) -> None:
        handles = [dist.all_reduce(b.grad, group=b.group, async_op=True) for b in buckets]
        for h in handles:
            h.wait()

    steps = {"compute": _plain_step(_model(args.width, args.layers), rank_batch),
             "ddp": _plain_step(ddp_models[0], rank_batch),
             "ddp_loss": _plain_step(ddp_models[1], rank_batch, global_loss=True),
             "comm": reduce_alone}
    steps.update({f"zero{z}": (lambda i, e=e: e.step(rank_batch(i))) for z, e in engines.items()})
    result: dict[str, float] = _time_interleaved(steps, args)
    result["wait"] = statistics.median(waits[args.warmup:])
    result["buckets"] = len(buckets)
    result["ddp_bytes"] = _count_ddp_bytes(ddp_models[0], steps["ddp"])
    for zero, engine in engines.items():
        with ByteCounter() as counter:
            engine.step(rank_batch(0))
        result[f"zero{zero}_bytes"] = counter.sent
    out.put((rank, result))
    autopar.destroy()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank")
    parser.add_argument("--bucket-mb", type=float, default=2.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, args, port, out)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    while len(results) < len(procs):
        try:
            rank, result = out.get(timeout=5)
            results[rank] = result
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise SystemExit(f"a rank failed (exit codes {dead}); see its traceback above")
    for p in procs:
        p.join()

    def worst(key: str) -> float:  # the slowest rank sets the pace
        return max(r[key] for r in results.values())

    n = args.ranks
    params = sum(p.numel() for p in _model(args.width, args.layers).parameters())
    grad_bytes = 4 * params
    compute, ddp, ddp_loss = worst("compute"), worst("ddp"), worst("ddp_loss")
    print(f"{n} gloo ranks, MLP {args.layers}x{args.width} ({params / 1e6:.2f} M params, "
          f"{grad_bytes / 2**20:.1f} MiB of fp32 gradients), bucket {args.bucket_mb} MiB "
          f"({int(results[0]['buckets'])} buckets), {args.batch} samples per rank, AdamW; median of "
          f"{args.steps} interleaved steps, slowest rank\n")
    rows = [["DDP", f"{ddp * 1e3:.1f}", "1.00", f"{ddp / ddp_loss:.2f}"],
            ["DDP + global loss (what Engine.step returns)", f"{ddp_loss * 1e3:.1f}", f"{ddp_loss / ddp:.2f}", "1.00"]]
    for zero in (0, 1, 2):
        s = worst(f"zero{zero}")
        rows.append([f"autopar Engine.step, zero={zero}", f"{s * 1e3:.1f}", f"{s / ddp:.2f}", f"{s / ddp_loss:.2f}"])
    rows.append(["compute only (no communication)", f"{compute * 1e3:.1f}", f"{compute / ddp:.2f}", f"{compute / ddp_loss:.2f}"])
    print(_table("Step time", ["", "ms / step", "ratio to DDP", "ratio to DDP + global loss"], rows) + "\n")

    comm, wait, step0 = worst("comm"), worst("wait"), worst("zero0")

    def hidden(step: float) -> str:
        return f"{max(0.0, min(1.0, (compute + comm - step) / comm)) * 100:.0f} %"
    print(_table("Reduction hidden behind backward (zero=0)", ["measure", "value"], [
        ["reduction of all buckets alone (ms)", f"{comm * 1e3:.1f}"],
        ["autopar: still waited for after backward, in finish() (ms)", f"{wait * 1e3:.1f}"],
        ["autopar: hidden = 1 - waited / alone", f"{max(0.0, 1 - wait / comm) * 100:.0f} %"],
        ["autopar: hidden = (compute + alone - step) / alone", hidden(step0)],
        ["DDP: hidden = (compute + alone - step) / alone", hidden(ddp)],
    ]) + "\n")

    ring = 2 * (n - 1) / n * grad_bytes
    rows = [["analytic ring all-reduce 2(n-1)/n x grad bytes", f"{ring / 2**20:.3f}", "1.000"],
            ["DDP (comm hook)", f"{worst('ddp_bytes') / 2**20:.3f}", f"{worst('ddp_bytes') / ring:.3f}"]]
    for zero in (0, 1, 2):
        b = worst(f"zero{zero}_bytes")
        rows.append([f"autopar zero={zero} (counted)", f"{b / 2**20:.3f}", f"{b / ring:.3f}"])
    print(_table("Bytes sent per rank per step", ["", "MiB", "ratio to analytic"], rows))
    print("\nautopar's count includes the 4-byte loss all-reduce and the padding of each bucket to a "
          "multiple of n; zero=1 adds an all-gather of the parameters (1.5x); zero=2 is a "
          "reduce-scatter + all-gather (1.0x).")

if __name__ == "__main__":
    main()
