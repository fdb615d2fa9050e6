"""What autopar costs on one device: a world of one (grid 1x1x1) against plain PyTorch.

    OMP_NUM_THREADS=1 python bench/bench_overhead.py [--layers 4] [--hidden 256] [--steps 10]

A plain ``python`` process, so ``autopar.init()`` makes a world of one, on CUDA where there is
a GPU and on the CPU otherwise. The same GPT-2 (built from a small config, same seed) is
trained with AdamW three ways, interleaved step by step so that a burst of other load lands on
all of them alike:

* plain PyTorch: ``loss.backward(); clip_grad_norm_; opt.step(); opt.zero_grad()``;
* ``autopar.parallelize`` on the plain model (engine only: buckets, clipping, global loss);
* the model built under ``auto_parallelize`` as well (the layers are autopar's, replicated on a
  1x1x1 grid, so this is the cost of the wrapper classes and their hooks).

The table gives the median ms per step, the ratio to plain PyTorch and the achieved model
TFLOP/s (6 * params * tokens per step; divide by the device's peak for MFU), and checks that all
three produce the same losses, so that the comparison is of equal work.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import autopar


def build(args: argparse.Namespace) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden,
                                  n_layer=args.layers, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    grid = autopar.init()
    device = grid.device
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.steps + 2)]

    plain = build(args).to(device)
    plain_opt = _adamw(plain.parameters())

    def plain_step(ids: torch.Tensor) -> float:
        ids = ids.to(device)
        loss = plain(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        return loss.item()

    engine = autopar.parallelize(build(args), optimizer=_adamw, clip_grad_norm=1.0)
    with autopar.auto_parallelize():
        layers = build(args)
    layered = autopar.parallelize(layers, optimizer=_adamw, clip_grad_norm=1.0)
    runs = {"plain PyTorch": plain_step,
            "autopar.parallelize": lambda ids: engine.step({"input_ids": ids, "labels": ids}),
            "auto_parallelize + parallelize": lambda ids: layered.step({"input_ids": ids, "labels": ids})}
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    for i, ids in enumerate(batches):
        for name, step in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            losses[name].append(step(ids))  # every variant ends in a host sync (its loss)
            if i >= 2:  # two warm-up steps
                times[name].append(time.perf_counter() - start)
    ref = losses["plain PyTorch"]
    params = sum(q.numel() for q in plain.parameters())
    tokens = args.batch * args.seq
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"GPT-2 {args.layers} x {args.hidden}, vocab {args.vocab}, {params / 1e6:.2f} M params, batch "
          f"{args.batch} x {args.seq}, AdamW + clipping, fp32; {where}; median of {args.steps} steps")
    print(f"{'run':>32} {'ms/step':>9} {'vs plain':>9} {'TFLOP/s':>8} {'max |dloss|':>12}")
    base = statistics.median(times["plain PyTorch"])
    for name in runs:
        t = statistics.median(times[name])
        dloss = max(abs(a - b) for a, b in zip(losses[name], ref))
        print(f"{name:>32} {t * 1e3:9.1f} {t / base:9.3f} {6 * params * tokens / t / 1e12:8.3f} {dloss:12.2e}")
        assert dloss < 1e-4, f"{name} trained differently from plain PyTorch ({dloss})"
    autopar.destroy()


if __name__ == "__main__":
    main()
