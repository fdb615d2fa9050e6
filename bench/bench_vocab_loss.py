"""The LM loss on vocabulary shards against gathering the logits first (issue 14.6).

4 gloo ranks train a Llama built from a small config with a large vocabulary (``--vocab``,
untied head) on grids that cut the vocabulary over y: y=2 x dp=2, y=4, and x=2 x y=2. Each grid
runs twice from the same weights and batches: with the engine's default, the cross-entropy on
the head's y shards (``intra_layer.vocab_loss``), and with ``vocab_parallel_loss=False``, which
all-gathers the logits over y and calls HF's loss on the full vocabulary, as a tensor-parallel
library without a vocabulary-parallel loss does. Per rank and step it reports

* the bytes sent over y by the tensor-parallel layers and the loss (``intra_layer.comm.COUNTER``),
  against the analytic volume of the logits' all-gather, ``T * V * 4 * (y-1)/y`` for T tokens
  on the rank, and of the sharded loss's two all-reduces, ``3 * T * 4 * 2(y-1)/y``;
* the peak bytes of tensors allocated during the step (torch's ``MemTracker``, a dispatch mode
  that follows every storage; this machine has no GPU for ``max_memory_allocated``), against
  the logits of one microbatch in fp32, ``T * V * 4`` gathered and ``T * V * 4 / y`` on shards;
* the step's loss against serial training of the same model on the same global batch.

    OMP_NUM_THREADS=1 python bench/bench_vocab_loss.py [--vocab 16384] [--seq 128]
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch.distributed._tools.mem_tracker import MemTracker

import autopar
from autopar.intra_layer.comm import COUNTER
from tables import table  # bench/ is on sys.path: the scripts run as files
from world import spawn_gloo

WORLD = 4
ROWS = 8  # global batch
GRIDS = [dict(y=2), dict(y=4), dict(x=2, y=2)]
MIB = 2**20


def _model(args: argparse.Namespace, parallel: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=2 * args.width,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=args.seq, tie_word_embeddings=False)
    if not parallel:
        return transformers.LlamaForCausalLM(cfg)
    with autopar.auto_parallelize():
        return transformers.LlamaForCausalLM(cfg)


def _batch(args: argparse.Namespace, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, args.vocab, (ROWS, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # a prompt that is not trained on: the loss counts items
    return {"input_ids": ids, "labels": labels}


def _serial_losses(args: argparse.Namespace) -> list[float]:
    model = _model(args, parallel=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(args.steps):
        loss = model(**_batch(args, step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def measure(grid: dict[str, int], shards: bool, args: argparse.Namespace) -> dict[str, Any]:
    g = autopar.init(**grid)
    try:
        engine = autopar.parallelize(_model(args, parallel=True), lambda p: torch.optim.AdamW(p, lr=1e-3),
                                     vocab_parallel_loss=None if shards else False)
        assert (engine.vocab_head is not None) == shards, "the engine did not take the loss path asked for"
        losses, peak, sent = [], 0, {}
        for step in range(args.steps):
            batch = autopar.shard_batch(_batch(args, step))
            if step == 0:  # the first step finds the layout and builds the optimizer: not counted
                losses.append(engine.step(batch))
                continue
            COUNTER.reset()
            COUNTER.enabled = True
            tracker = MemTracker()
            with tracker:
                losses.append(engine.step(batch))
            COUNTER.enabled = False
            peak = max(peak, tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
            for kind, n in COUNTER.bytes.items():
                sent[kind] = sent.get(kind, 0.0) + n / (args.steps - 1)
        tokens = ROWS // g.size("dp") * args.seq
        return {"losses": losses, "peak": peak, "sent": sent, "tokens": tokens, "y": g.size("y")}
    finally:
        COUNTER.enabled = False
        autopar.destroy()


def _rows(results: list[tuple[dict, bool, list[dict]]], ref: list[float], args: argparse.Namespace) -> list[list[str]]:
    out = []
    for grid, shards, got in results:
        r = max(got, key=lambda m: m["peak"])
        y, tokens = r["y"], r["tokens"]
        logits = tokens * args.vocab * 4
        gather_y = r["sent"].get("all_gather[y]", 0.0)
        reduce_y = r["sent"].get("all_reduce[y]", 0.0)
        gathered_logits = logits * (y - 1) / y
        loss_reduces = 3 * tokens * 4 * 2 * (y - 1) / y
        error = max(abs(a - b) for m in got for a, b in zip(m["losses"], ref))
        name = "x".join(f"{a}{n}" for a, n in grid.items())
        out.append([name, "shards" if shards else "gathered", str(tokens),
                    f"{gather_y / MIB:.2f}", f"{gathered_logits / MIB:.2f}" if not shards else "0",
                    f"{reduce_y / MIB:.3f}", f"{loss_reduces / MIB:.3f}" if shards else "0",
                    f"{r['peak'] / MIB:.1f}", f"{(logits / y if shards else logits) / MIB:.1f}",
                    f"{error:.1e}"])
    return out


def worker(rank: int, args: argparse.Namespace) -> None:
    """Every grid and both losses on one world (imports once); rank 0 prints the table."""
    start = time.perf_counter()
    ref = _serial_losses(args) if rank == 0 else []
    results = []
    for grid in GRIDS:
        for shards in (True, False):
            mine = measure(grid, shards, args)
            gathered: list[Any] = [None] * WORLD
            dist.all_gather_object(gathered, mine)
            results.append((grid, shards, gathered))
    if rank == 0:
        params = sum(p.numel() for p in _model(args, parallel=False).parameters())
        print(f"\n{WORLD} gloo ranks, Llama 2 blocks x {args.width}, vocab {args.vocab} (untied head), seq {args.seq}, "
              f"{params / 1e6:.2f} M params, global batch {ROWS} (a quarter of each row ignored), AdamW, fp32; "
              f"{args.steps - 1} counted step(s) after 1; T = tokens per rank, fullest rank shown\n")
        print(table("The LM loss on vocabulary shards vs on gathered logits, per rank and step",
                    ["grid", "loss on", "T", "y all-gather MiB", "logits' all-gather (analytic)",
                     "y all-reduce MiB", "sharded loss's all-reduces (analytic)", "peak MiB during step",
                     "one microbatch's logits (analytic)", "max abs(loss - serial)"],
                    _rows(results, ref, args)))
        print("\ny all-gather: every gather over y in the step (activations of y-sharded layers too); the two loss "
              "paths differ by exactly the logits' all-gather. y all-reduce: the layers' input-gradient "
              "all-reduces plus, on shards, the loss's. Peak: tensors allocated inside the step (activations, "
              f"temporaries, gradients), MemTracker. wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    spawn_gloo(worker, WORLD, args)
