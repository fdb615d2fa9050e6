"""What every example script shares: the command line, the grid, the model build, the data of
the text examples and the training loop with its progress bar, CSV, loss curve and summary.

Why one module: the examples differ only in the model and the data. Keeping the loop here means
every family is trained, measured and logged the same way, so their CSVs compare directly, and a
fix to the loop reaches all of them. Each example stays a short, readable recipe:

    args = common.parser(__doc__, out="runs/llama").parse_args()
    grid = common.init(args)
    model = common.build(lambda: LlamaForCausalLM(config), args, LlamaForCausalLM)
    engine = autopar.parallelize(model, optimizer=common.optimizer(args), ...)
    common.train(engine, batches, args, grid, "Llama", unit="tokens", per_step=...)

Surviving preemption: with ``--ckpt-dir DIR`` the loop resumes from the newest checkpoint in DIR
(``autopar.resume``), saves every ``--save-every`` steps and at the end (``autopar.save_step``),
and on SIGTERM or SIGUSR1 to any rank (``autopar.PreemptionHook``) every rank saves at the next
step boundary and the job exits cleanly with status 0. Run the same command again, or let Slurm
requeue it (``examples/launch/slurm_*.sbatch``), and it continues where it stopped: the batches
of the finished steps are skipped and the LR schedule continues, so a resumed run trains exactly
like an uninterrupted one.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import autopar
from autopar.checkpoint.steps import step_path
from autopar.runtime.gridspec import parse_grid

DATA = Path(__file__).resolve().parent / "data"
CORPUS = DATA / "corpus.txt"
EOS = "<|endoftext|>"
VOCAB_SIZE = 1024


def grid_arg(text: str) -> dict[str, int]:
    """argparse type for ``--grid pp=2,x=2``."""
    try:
        return parse_grid(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser(doc: str, out: str, steps: int = 200, global_batch: int = 16, seq_len: int = 128, lr: float = 2e-3,
           layers: int = 4, hidden: int = 128, heads: int = 4, grid: str = "",
           microbatches: int = 1) -> argparse.ArgumentParser:
    """The options every example takes; defaults per example. ``doc`` is the script's docstring.
    ``grid``: the example's default grid, used when neither ``--grid`` nor AUTOPAR_GRID is given."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                epilog="\n\n".join(doc.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    fallback = grid or "all data parallel"
    p.add_argument("--grid", type=grid_arg, default=None,
                   help="grid sizes, e.g. 'dp=4' or 'pp=2,x=2'; dp is inferred when left out "
                        f"(default: AUTOPAR_GRID, as set by `autopar run --grid`, else {fallback})")
    p.set_defaults(default_grid=grid)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--global-batch", type=int, default=global_batch, help="samples per step, all ranks together")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per sample")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=20, help="steps of linear learning-rate warm-up")
    p.add_argument("--microbatches", type=int, default=None,
                   help=f"microbatches per rank and step (default: {microbatches} with pp > 1, where they fill "
                        "the pipeline, else 1)")
    p.set_defaults(pipeline_microbatches=microbatches)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained", type=Path, default=None,
                   help="a local Hugging Face folder (config + weights) to start from instead of the small config")
    p.add_argument("--out", type=Path, default=Path(out) / "metrics.csv",
                   help="per-step CSV; loss.png and cached files go to the same folder")
    p.add_argument("--ckpt-dir", type=Path, default=None,
                   help="folder of step checkpoints: resume from the newest, save there every --save-every steps, "
                        "at the end and when preempted (default: no checkpoints)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end and "
                                                             "when preempted)")
    p.add_argument("--keep-last", type=int, default=2, help="step checkpoints to keep in --ckpt-dir")
    p.add_argument("--preempt-signals", default="SIGTERM,SIGUSR1",
                   help="signals that make every rank save and exit at the next step boundary (with --ckpt-dir)")
    return p


def init(args: argparse.Namespace) -> autopar.Grid:
    """``autopar.init`` on the ``--grid`` (or ``AUTOPAR_GRID``), one share of the cores per rank,
    and the run folder."""
    if min(args.steps, args.global_batch, args.seq_len, args.keep_last) < 1 or args.save_every < 0:
        raise SystemExit("--steps, --global-batch, --seq-len and --keep-last must be positive, --save-every >= 0")
    args.start_step = 0  # the step a resumed run continues from (train sets it); the LR schedule reads it
    sizes = args.grid
    if sizes is None:  # an empty dict makes autopar.init read AUTOPAR_GRID
        sizes = {} if os.environ.get("AUTOPAR_GRID") or not args.default_grid else parse_grid(args.default_grid)
    try:
        grid = autopar.init(**sizes, seed=args.seed)
    except ValueError as e:
        if args.grid is None and sizes:
            raise SystemExit(f"{e}\nThis example's default grid is {args.default_grid}; launch that many "
                             "ranks (bash scripts/demo.sh) or pass --grid, e.g. --grid dp=1 for one process") from None
        raise
    if args.microbatches is None:  # with pp = 1 they would only be gradient accumulation
        args.microbatches = args.pipeline_microbatches if grid.sizes["pp"] > 1 else 1
    if "OMP_NUM_THREADS" not in os.environ:  # don't oversubscribe cores with N ranks per machine
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // grid.world_size))
    if grid.rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    return grid


def build(make: Callable[[], nn.Module], args: argparse.Namespace, auto_class: Any) -> nn.Module:
    """The model, 3D-parallel when the grid has x*y*z > 1: ``make()`` from the small config, or
    ``auto_class.from_pretrained(--pretrained)``; built inside ``auto_parallelize`` either way so
    the weights are the serial ones, sliced."""
    grid = autopar.current_grid()
    with autopar.auto_parallelize() if grid.size("x", "y", "z") > 1 else contextlib.nullcontext():
        model = auto_class.from_pretrained(args.pretrained) if args.pretrained else make()
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        model.loss_type = "ForCausalLM"  # transformers can't infer it from every class name
    return model


def optimizer(args: argparse.Namespace, schedules: list) -> Callable:
    """AdamW with linear warm-up. The engine builds the optimizer once it knows this rank's
    parameters (with pp > 1, in the first step), so the schedule is attached in the factory and
    collected in ``schedules`` for the loop to step. A resumed run continues the schedule at
    ``args.start_step``: with pp > 1 the schedule is built in the first step, after ``resume``."""
    def make(params):
        opt = torch.optim.AdamW(params, lr=args.lr)
        schedules.append(torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + args.start_step + 1) / (args.warmup + 1))))
        return opt
    return make


def tokenizer(args: argparse.Namespace, corpus: Path = CORPUS):
    """The pretrained folder's ``tokenizer.json`` when there is one; else a byte-level BPE trained
    on the corpus by rank 0 on first use and cached in the run folder (no download)."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    if args.pretrained and (args.pretrained / "tokenizer.json").exists():
        return Tokenizer.from_file(str(args.pretrained / "tokenizer.json"))
    path = args.out.parent / f"tokenizer-{corpus.stem}-{VOCAB_SIZE}.json"
    if autopar.current_grid().rank == 0 and not path.exists():
        bpe = ByteLevelBPETokenizer()
        bpe.train([str(corpus)], vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False, special_tokens=[EOS])
        bpe.save(str(path))
    if dist.is_initialized():
        dist.barrier()
    return Tokenizer.from_file(str(path))


def lm_batches(tokens: torch.Tensor, batch: int, seq_len: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless global batches of random windows of ``tokens`` for causal-LM training; the seed
    makes them identical on every rank, ``autopar.shard_batch`` then takes this rank's share."""
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


def _memory_mib(engine: autopar.Engine) -> dict[str, float]:
    """This rank's model memory (parameters, gradients, optimizer state, activations of the first
    step: ``autopar.memory_report``) and the process's peak resident memory, in MiB."""
    report = autopar.memory_report(engine)
    peak = report.peak_allocated if report.peak_allocated is not None else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"model_mem_mib": report.total("device") / 2**20, "peak_mem_mib": peak / 2**20}


def _resume(engine: autopar.Engine, batches: Iterator[Any], args: argparse.Namespace) -> int:
    """The step to start from: the newest checkpoint in ``--ckpt-dir`` is loaded and the batches
    of its steps are drawn and dropped, so the data continues as in an uninterrupted run."""
    if args.ckpt_dir is None:
        return 0
    start = autopar.resume(engine, args.ckpt_dir, keep_last=args.keep_last)
    for _ in range(start):
        next(batches)
    args.start_step = start
    if start and engine.grid.rank == 0:
        print(f"resumed from {step_path(args.ckpt_dir, start)}", flush=True)
    return start


def train(engine: autopar.Engine, batches: Iterator[Any], args: argparse.Namespace, title: str, unit: str,
          per_step: int, schedules: list) -> list[dict]:
    """The training loop: steps up to ``args.steps`` on this rank's share of each global batch,
    from the newest checkpoint in ``--ckpt-dir`` if there is one. Rank 0 shows a progress bar,
    writes one CSV row per step (loss, ``unit``/s, step time, memory; appended to when resuming),
    and at the end the loss curve of this run (``loss.png``) and a summary. ``per_step``:
    ``unit``s per global batch."""
    grid = engine.grid
    is_main = grid.rank == 0
    rate = f"{unit}_per_s"
    rows: list[dict] = []
    first = _resume(engine, batches, args)
    start = time.perf_counter()
    stopped = None
    with contextlib.ExitStack() as stack:
        preempt = None
        if args.ckpt_dir is not None:
            preempt = stack.enter_context(autopar.PreemptionHook(args.preempt_signals.split(",")))
        if is_main:
            append = first > 0 and args.out.exists()
            metrics = stack.enter_context(open(args.out, "a" if append else "w", newline=""))
            writer = csv.DictWriter(metrics, ["step", "loss", rate, "step_time_s", "elapsed_s",
                                              "model_mem_mib", "peak_mem_mib"])
            if not append:
                writer.writeheader()
        bar = stack.enter_context(tqdm(range(first + 1, args.steps + 1), disable=not is_main, unit="step"))
        for step in bar:
            batch = autopar.shard_batch(next(batches))
            t0 = time.perf_counter()
            loss = engine.step(batch)
            for schedule in schedules:
                schedule.step()
            now = time.perf_counter()
            rows.append({"step": step, "loss": loss, rate: per_step / (now - t0), "step_time_s": now - t0,
                         "elapsed_s": now - start, **_memory_mib(engine)})
            if is_main:
                writer.writerow(rows[-1])
                metrics.flush()  # readable while the run goes on
                bar.set_postfix(loss=f"{loss:.3f}", **{unit[:3] + "_s": f"{rows[-1][rate]:.0f}"})
            if preempt is None:
                continue
            stop = preempt.should_stop()  # collective: every rank takes the same branch
            if stop or step == args.steps or (args.save_every and step % args.save_every == 0):
                autopar.save_step(engine, args.ckpt_dir, step, keep_last=args.keep_last)
            if stop:
                stopped = (step, preempt.received)
                break
    train_time = time.perf_counter() - start
    if is_main and stopped is not None:
        signal_name = stopped[1].name if stopped[1] is not None else "another rank's signal"
        print(f"\npreempted ({signal_name}) after step {stopped[0]}: saved "
              f"{step_path(args.ckpt_dir, stopped[0])}, exiting; run the same command "
              "again to resume", flush=True)
    if is_main and rows:
        sizes = " ".join(f"{a}={n}" for a, n in grid.sizes.items() if n > 1 or a == "dp")
        save_loss_plot(rows, args.out.parent / "loss.png", f"{title} on {grid.world_size} rank(s): {sizes}")
        resumed = f" (resumed after step {first})" if first else ""
        print(f"\nsummary: {len(rows)} steps{resumed}, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}; "
              f"{per_step * len(rows) / train_time:,.0f} {unit}/s over {train_time:.1f} s of training; "
              f"model memory {rows[-1]['model_mem_mib']:.1f} MiB on rank 0\n"
              f"wrote {args.out} and {args.out.parent / 'loss.png'}", flush=True)
    elif is_main:
        print(f"nothing to train: the checkpoint in {args.ckpt_dir} is at step {first} of {args.steps}", flush=True)
    return rows


def describe(model: nn.Module, what: str) -> None:
    """One line on rank 0 about the model and the run."""
    if autopar.current_grid().rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"{type(model).__name__}: {params / 1e6:.2f}M parameters on rank 0; {what}", flush=True)


def causal_lm_main(args: argparse.Namespace, title: str, model_class: Any,
                   make_config: Callable[[argparse.Namespace, int, int], Any]) -> None:
    """The whole job of a text example: train ``model_class`` (``make_config(args, vocab, eos)``,
    or ``--pretrained``) as a causal LM on the shipped corpus under the command line's grid."""
    start = time.perf_counter()
    grid = init(args)
    tok = tokenizer(args)
    tokens = torch.tensor(tok.encode(CORPUS.read_text(encoding="utf-8")).ids, dtype=torch.long)
    vocab, eos = tok.get_vocab_size(), tok.token_to_id(EOS) or 0
    model = build(lambda: model_class(make_config(args, vocab, eos)), args, model_class)
    schedules: list = []
    engine = autopar.parallelize(model, optimizer=optimizer(args, schedules), num_microbatches=args.microbatches,
                                 clip_grad_norm=1.0)
    describe(model, f"vocab {vocab}; corpus {len(tokens):,} tokens; {args.steps} steps of "
                    f"{args.global_batch} x {args.seq_len} tokens")
    train(engine, lm_batches(tokens, args.global_batch, args.seq_len, args.seed), args, title, "tokens",
          args.global_batch * args.seq_len, schedules)
    if grid.rank == 0:
        print(f"wall time {time.perf_counter() - start:.1f} s")
    autopar.destroy()
