"""Per-rank memory of a pipeline after ``parallelize`` and at the peak of a step, against 1/pp.

4 gloo ranks run a Llama built from a small config (``--layers`` blocks, ``--width`` wide,
vocabulary 4096) on the grids pp=1 x dp=4, pp=2 x dp=2 and pp=4 x dp=1, with 1F1B over M=4
microbatches. For each grid and for the fullest rank:

* *after parallelize*: bytes of parameters the rank holds with real storage (stand-ins for
  other stages' weights hold none), with and without ``sample_batch`` (without it the split is
  made at the first forward, and the stage is moved to the device only then);
* *at peak*: ``autopar.memory_report`` after one step: parameters + gradients + optimizer state
  + the activations saved for backward (peak), and the p2p tensors in flight at most;
* the ideal: the serial model's parameter bytes P over pp (and 1F1B's bound of pp microbatches
  of boundary activations in flight), so the ratio column shows stage imbalance only.

On CUDA, ``torch.cuda.max_memory_allocated`` would replace the tensor counts; this machine has
no GPU, so the figures are tensor bytes counted exactly.

    OMP_NUM_THREADS=1 python bench/bench_pipeline_memory.py [--layers 8] [--width 128]
"""
from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import autopar

WORLD = 4
GRIDS = [dict(pp=1, dp=4), dict(pp=2, dp=2), dict(pp=4, dp=1)]


def _model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=args.width, intermediate_size=2 * args.width,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=args.seq)
    return transformers.LlamaForCausalLM(cfg)


def _batch(args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (16, args.seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _held(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        storage = p.untyped_storage()
        if storage.nbytes() >= p.numel() * p.element_size() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += p.numel() * p.element_size()
    return total


def measure(grid: dict, args: argparse.Namespace, sample: bool) -> dict:
    autopar.init(**grid)
    batch = autopar.shard_batch(_batch(args))
    m = 4 if grid["pp"] > 1 else 1
    engine = autopar.parallelize(_model(args), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                                 num_microbatches=m, sample_batch=batch if sample and grid["pp"] > 1 else None)
    after = _held(engine.model)
    engine.step(batch)
    report = autopar.memory_report(engine)
    dev = report.on_device
    peak = dev["parameters"] + dev["gradients"] + dev["optimizer_state"] + dev["activations"]
    in_flight = engine.pipeline.p2p.peak_in_flight if engine.pipeline is not None else 0
    autopar.destroy()
    return {"after": after, "peak": peak, "params": dev["parameters"], "acts": dev["activations"],
            "in_flight": in_flight}


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    full = sum(p.numel() * p.element_size() for p in _model(args).parameters())
    rows = []
    for grid in GRIDS:
        for sample in ((False, True) if grid["pp"] > 1 else (False,)):
            mine = measure(grid, args, sample)
            gathered: list = [None] * WORLD
            dist.all_gather_object(gathered, mine)
            rows.append((grid, sample, gathered))
    if rank == 0:
        print(f"\n## Pipeline memory per rank (Llama, {args.layers} blocks, width {args.width}, "
              f"P = {full / 2**20:.2f} MiB of parameters; 1F1B, M=4; fullest rank)")
        print("| grid | split made | params held after parallelize | ideal P/pp | ratio | "
              "peak (params+grads+AdamW+acts) | ideal 4P/pp + acts | ratio | p2p sends in flight (max) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for grid, sample, got in rows:
            pp = grid["pp"]
            after = max(r["after"] for r in got)
            worst = max(got, key=lambda r: r["peak"])
            ideal_peak = 4 * full / pp + worst["acts"]
            when = "n/a" if pp == 1 else ("in parallelize (sample_batch)" if sample else "at the first forward")
            print(f"| pp={pp} x dp={grid['dp']} | {when} | {after / 2**20:.2f} MiB | {full / pp / 2**20:.2f} MiB | "
                  f"{after / (full / pp):.2f} | {worst['peak'] / 2**20:.2f} MiB | {ideal_peak / 2**20:.2f} MiB | "
                  f"{worst['peak'] / ideal_peak:.2f} | {max(r['in_flight'] for r in got)} |")
        print("\n'after parallelize' without sample_batch is the host-side model until the first forward "
              "splits it; the device then receives the stage only.")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, args), nprocs=WORLD)
