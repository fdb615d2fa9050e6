"""Offload benchmarks; prints two tables.

1. CPU optimizer step throughput (parameters per second) on one flat set of fp32 parameters:
   torch AdamW single-tensor / foreach / fused, and autopar's ``optimizer+step`` stepper (fused
   AdamW on the host masters plus the gradient copy in and the weight copy out it needs).
2. Memory of one rank training a small GPT-2 with each offload mode (and recompute), from
   ``autopar.memory_report``, next to the analytic figures for fp32 AdamW:
   weights 4 B/param, gradients 4 B/param, state 8 B/param (+4 B per tensor for ``step``).

Run: ``OMP_NUM_THREADS=1 python bench/bench_offload.py [--numel 4194304] [--repeats 5]``. The
memory part starts a world of one (plain ``python``); it needs no GPU.
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from torch import nn

import autopar
from autopar.offload import CpuStepper


def _params(numel: int, tensors: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(numel // tensors, generator=g)) for _ in range(tensors)]


def bench_step(numel: int, tensors: int, repeats: int) -> None:
    """Round-robin over the implementations, best time of each: the machine is shared, so a
    burst of someone else's work should not land on one implementation only."""
    candidates = {}
    for name, kwargs in (("torch AdamW single-tensor", dict(foreach=False)), ("torch AdamW foreach", dict(foreach=True)),
                         ("torch AdamW fused", dict(fused=True))):
        params = _params(numel, tensors)
        candidates[name] = (params, torch.optim.AdamW(params, lr=1e-3, **kwargs).step)
    params = _params(numel, tensors)
    stepper = CpuStepper(lambda ps: torch.optim.AdamW(ps, lr=1e-3), params, SimpleNamespace(device=torch.device("cpu")))
    candidates["autopar optimizer+step (+copies)"] = (params, stepper.step)
    grads = [torch.randn(numel // tensors) for _ in range(tensors)]
    best = dict.fromkeys(candidates, float("inf"))
    for i in range(repeats + 1):  # the first round creates the state: not timed
        for name, (params, step) in candidates.items():
            for p, g in zip(params, grads):
                p.grad = g
            t0 = time.perf_counter()
            step()
            if i:
                best[name] = min(best[name], time.perf_counter() - t0)
    print(f"\n## CPU AdamW step: {numel / 1e6:.1f} M fp32 params in {tensors} tensors, "
          f"{torch.get_num_threads()} thread(s), best of {repeats}")
    print(f"{'implementation':<34} {'s/step':>9} {'Mparams/s':>10}")
    for name, t in best.items():
        print(f"{name:<34} {t:9.4f} {numel / t / 1e6:10.1f}")


def _gpt2(recompute: bool):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=1024, n_positions=128, n_embd=256, n_layer=4, n_head=4)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def bench_memory() -> None:
    autopar.init()
    ids = torch.randint(0, 1024, (8, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    rows = []
    for offload, recompute in ((None, False), ("optimizer", False), ("optimizer+step", False), (None, True)):
        engine = autopar.parallelize(_gpt2(recompute), optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4),
                                     offload=offload, recompute=recompute)
        engine.step(autopar.shard_batch(batch))
        rows.append((offload, recompute, engine, autopar.memory_report(engine)))
    numel = sum(p.numel() for p in rows[0][2].params)
    tensors = len(rows[0][2].params)
    analytic = {None: ((4, 4, 8), (0, 0, 0)), "optimizer": ((4, 4, 0), (0, 0, 8)),
                "optimizer+step": ((4, 4, 0), (4, 4, 8))}
    mib = 2.0 ** 20
    print(f"\n## Memory of one rank, GPT-2 {numel / 1e6:.2f} M params ({tensors} tensors), batch 8 x 128, "
          "fp32 AdamW; MiB measured (analytic)")
    print(f"{'offload':<15} {'recompute':<9} {'where':<7} {'params':>17} {'grads':>17} {'opt state':>17} "
          f"{'activations':>12} {'total':>9}")
    for offload, recompute, engine, report in rows:
        for where, table, per_param in (("device", report.on_device, analytic[offload][0]),
                                        ("host", report.on_host, analytic[offload][1])):
            expect = [b * numel for b in per_param]
            expect[2] += 4 * tensors if (where == "host") == (offload == "optimizer+step") else 0
            cells = " ".join(f"{table[k] / mib:8.2f} ({e / mib:6.2f})"
                             for k, e in zip(("parameters", "gradients", "optimizer_state"), expect))
            print(f"{str(offload):<15} {str(recompute):<9} {where:<7} {cells} {table['activations'] / mib:12.2f} "
                  f"{sum(table.values()) / mib:9.2f}")
    autopar.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 22)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bench_step(args.numel, args.tensors, args.repeats)
    bench_memory()


if __name__ == "__main__":
    main()
