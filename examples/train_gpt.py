"""Train a small GPT-2 on a public-domain corpus with autopar: the project's main demo job.

Why it looks like this: it is a complete training run that needs nothing but this repository.
The model comes from a config, the corpus ships in ``examples/data/``, and the tokenizer is a
byte-level BPE built from that corpus on first use, so no download happens. The same script runs
as one process or under any launcher, and the parallel layout is only a command-line flag:

    python examples/train_gpt.py
    torchrun --nproc_per_node 4 examples/train_gpt.py --grid dp=4
    mpirun -n 4 --oversubscribe python examples/train_gpt.py
    srun -O -n 4 python examples/train_gpt.py --grid pp=2,x=2 --microbatches 2
    torchrun --nproc_per_node 8 examples/train_gpt.py --grid pp=2,x=2,z=2 --microbatches 2

Every rank draws the same seeded global batch and trains on its ``autopar.shard_batch`` share, so
a run on any grid follows the serial run. Rank 0 shows a progress bar and writes one CSV row per
step (loss, throughput), a loss curve (``loss.png``) and a summary next to the CSV.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tokenizers import ByteLevelBPETokenizer, Tokenizer
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

import autopar

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
VOCAB_SIZE = 1024
EOS = "<|endoftext|>"
GRID_AXES = ("pp", "dp", "x", "y", "z")


def parse_grid(spec: str) -> dict[str, int]:
    """``"pp=2,x=2"`` -> ``{"pp": 2, "x": 2}``; axes left out keep ``autopar.init``'s defaults."""
    grid = {}
    for item in filter(None, spec.replace(" ", "").split(",")):
        axis, _, size = item.partition("=")
        if axis not in GRID_AXES or not size.isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(f"bad grid entry {item!r}: use e.g. pp=1,dp=4,x=2 "
                                             f"with axes from {GRID_AXES}")
        grid[axis] = int(size)
    return grid


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=parse_grid, default={},
                   help="grid sizes, e.g. 'dp=4' or 'pp=2,x=2'; dp is inferred when left out")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step, all ranks together")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20, help="steps of linear learning-rate warm-up")
    p.add_argument("--microbatches", type=int, default=1, help="microbatches per rank and step")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--out", type=Path, default=Path("runs/gpt/metrics.csv"),
                   help="per-step CSV; the tokenizer and loss.png go to the same folder")
    args = p.parse_args()
    if min(args.steps, args.global_batch, args.seq_len) < 1:
        p.error("--steps, --global-batch and --seq-len must be positive")
    return args


def load_tokens(corpus: Path, run_dir: Path, rank: int) -> tuple[torch.Tensor, Tokenizer]:
    """The corpus as one long tensor of token ids, and the tokenizer. Rank 0 trains the
    tokenizer once and caches it in the run folder; the other ranks wait and load it."""
    path = run_dir / f"tokenizer-{corpus.stem}-{VOCAB_SIZE}.json"
    if rank == 0 and not path.exists():
        bpe = ByteLevelBPETokenizer()
        bpe.train([str(corpus)], vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                  special_tokens=[EOS])
        bpe.save(str(path))
    if dist.is_initialized():
        dist.barrier()
    tokenizer = Tokenizer.from_file(str(path))
    ids = tokenizer.encode(corpus.read_text(encoding="utf-8")).ids
    return torch.tensor(ids, dtype=torch.long), tokenizer


def global_batches(tokens: torch.Tensor, batch: int, seq_len: int, seed: int):
    """Endless global batches of random windows; the seed makes them identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(len(tokens) - seq_len, (batch,), generator=gen)
        windows = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
        yield {"input_ids": windows, "labels": windows}  # the model shifts labels itself


def save_loss_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    grid = autopar.init(**args.grid, seed=args.seed)
    if "OMP_NUM_THREADS" not in os.environ:  # don't oversubscribe cores with N ranks per machine
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // grid.world_size))
    is_main = grid.rank == 0
    run_dir = args.out.parent
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    tokens, tokenizer = load_tokens(args.corpus, run_dir, grid.rank)
    vocab, eos = tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS)
    config = GPT2Config(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, n_positions=args.seq_len,
                        n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # deterministic steps
    tensor_parallel = grid.size("x", "y", "z") > 1
    with autopar.auto_parallelize() if tensor_parallel else contextlib.nullcontext():
        model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # transformers can't infer it from the class name of GPT-2
    # The engine builds the optimizer once it knows this rank's parameters (with pp > 1, in the
    # first step), so the learning-rate warm-up is attached in the factory.
    schedules = []

    def make_optimizer(params):
        optimizer = torch.optim.AdamW(params, lr=args.lr)
        schedules.append(torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / (args.warmup + 1))))
        return optimizer

    engine = autopar.parallelize(model, optimizer=make_optimizer, num_microbatches=args.microbatches,
                                 clip_grad_norm=1.0)
    if is_main:
        params = sum(p.numel() for p in model.parameters())
        print(f"GPT-2: {params / 1e6:.2f}M parameters on rank 0, vocab {vocab}; corpus: {len(tokens):,} tokens; "
              f"{args.steps} steps of {args.global_batch} x {args.seq_len} tokens", flush=True)

    tokens_per_step = args.global_batch * args.seq_len
    rows = []
    batches = global_batches(tokens, args.global_batch, args.seq_len, args.seed)
    train_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if is_main:
            metrics = stack.enter_context(open(args.out, "w", newline=""))
            writer = csv.DictWriter(metrics, ["step", "loss", "tokens_per_s", "step_time_s", "elapsed_s"])
            writer.writeheader()
        bar = stack.enter_context(tqdm(range(1, args.steps + 1), disable=not is_main, unit="step"))
        for step in bar:
            batch = autopar.shard_batch(next(batches))
            t0 = time.perf_counter()
            loss = engine.step(batch)
            for schedule in schedules:
                schedule.step()
            now = time.perf_counter()
            rows.append({"step": step, "loss": loss, "tokens_per_s": tokens_per_step / (now - t0),
                         "step_time_s": now - t0, "elapsed_s": now - train_start})
            if is_main:
                writer.writerow(rows[-1])
                metrics.flush()  # readable while the run goes on
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rows[-1]['tokens_per_s']:.0f}")
    train_time = time.perf_counter() - train_start

    if is_main:
        save_loss_plot(rows, run_dir / "loss.png",
                       f"GPT-2 on {grid.world_size} rank(s): "
                       + " ".join(f"{a}={n}" for a, n in grid.sizes.items() if n > 1 or a == "dp"))
        print(f"\nsummary: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}; "
              f"{tokens_per_step * len(rows) / train_time:,.0f} tokens/s "
              f"over {train_time:.1f} s of training; wall time {time.perf_counter() - start:.1f} s\n"
              f"wrote {args.out} and {run_dir / 'loss.png'}")
    autopar.destroy()


if __name__ == "__main__":
    main()
