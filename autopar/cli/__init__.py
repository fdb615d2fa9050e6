"""The ``autopar`` console script: ``run`` a script on N ranks, ``check`` the grid against serial
training, ``plan`` memory and communication for a model and world size.

    autopar run -n 8 --grid pp=2,x=2 train.py --steps 100
    autopar run -n 64 --grid auto --model llama --hardware h100 --global-batch 512 train.py
    autopar check --model llama --grid x=2,y=2,z=2
    autopar plan --model gpt2 --world 8
    autopar plan --dry-run --model llama --world 16384 --grid pp=8,x=2,y=2,z=2
"""
from __future__ import annotations

import argparse
import math
import shlex

from ..runtime.state import parse_grid
from . import check, dry_run, plan
from .launch import LAUNCHERS, Job, launch


def _grid(text: str) -> dict[str, int] | str:
    if text.strip() == "auto":
        return "auto"
    try:
        return parse_grid(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_launch_arguments(p: argparse.ArgumentParser, nprocs_required: bool) -> None:
    p.add_argument("-n", "--nprocs", type=int, required=nprocs_required, default=None,
                   help="ranks in all" + ("" if nprocs_required else " (default: the grid's product)"))
    p.add_argument("--nodes", type=int, default=1, help="nodes the ranks spread over (evenly)")
    p.add_argument("--grid", type=_grid, default={}, help="e.g. pp=2,dp=2,x=2; passed to autopar.init() "
                   "as AUTOPAR_GRID; dp is inferred when left out")
    p.add_argument("--launcher", choices=LAUNCHERS, default="auto",
                   help="auto: srun inside a Slurm allocation, local processes on one node, torchrun on several")
    p.add_argument("--launcher-args", type=shlex.split, default=[],
                   help="extra flags for the launcher, one quoted string, e.g. '--overcommit'")
    p.add_argument("--master-addr", default=None, help="torchrun on several nodes: the rendezvous host")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--dry-run", action="store_true", help="print the launch command, start nothing")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autopar", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start a Python script on N ranks with the right launcher")
    _add_launch_arguments(run, nprocs_required=True)
    run.add_argument("--model", default=None, help="with --grid auto: the model the planner ranks grids for "
                     "(a family of `autopar plan` or a Hugging Face config.json)")
    run.add_argument("--hardware", default=None, help="with --grid auto: a preset (h100, a100-80g, h200, cpu-gloo) "
                     "or a JSON file")
    run.add_argument("--global-batch", type=int, default=None, help="with --grid auto: sequences per step")
    run.add_argument("--seq-len", type=int, default=None, help="with --grid auto: tokens per sequence")
    run.add_argument("script", help="the Python script every rank runs")
    run.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    chk = sub.add_parser("check", help="train a tiny model on the grid and serially; print the errors")
    _add_launch_arguments(chk, nprocs_required=False)
    check.add_arguments(chk)
    pln = sub.add_parser("plan", help="predicted memory and communication per rank (shape only)")
    plan.add_arguments(pln)
    pln.add_argument("--grid", type=_grid, default={}, help="one grid, e.g. pp=2,x=2 (default: rank them all)")
    dry_run.add_arguments(pln)
    return p


def _job(args: argparse.Namespace, script: list[str]) -> Job:
    nprocs = args.nprocs or math.prod(args.grid.values())
    return Job(nprocs=nprocs, script=script, grid=args.grid, nodes=args.nodes, launcher=args.launcher,
               launcher_args=args.launcher_args, master_addr=args.master_addr, master_port=args.master_port)


def _check_argv(args: argparse.Namespace) -> list[str]:
    """The check's own options, forwarded to every rank's ``python -m autopar.cli.check``."""
    argv = ["--factory", args.factory] if args.factory else ["--model", args.model]
    for flag in ("steps", "global_batch", "microbatches", "lr", "seed", "bound"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return argv + (["--fp64"] if args.fp64 else [])


def _auto_grid(args: argparse.Namespace) -> dict[str, int]:
    """``run --grid auto``: the planner's top grid, chosen once here and handed to every rank as
    ``AUTOPAR_GRID``, so the ranks need not agree on anything."""
    from . import cost

    missing = [f for f in ("model", "hardware", "global_batch") if getattr(args, f) is None]
    if missing:
        raise ValueError("--grid auto needs " + ", ".join(f"--{f.replace('_', '-')}" for f in missing))
    best = cost.choose_grid(args.nprocs, args.model, args.hardware, args.global_batch, args.seq_len)
    print(f"autopar run: --grid auto chose {','.join(f'{a}={n}' for a, n in best.sizes.items())} "
          f"({best.microbatches} microbatch(es), predicted {best.step:.3g} s per step on {args.hardware})")
    return best.sizes


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        if args.command == "plan":
            return dry_run.main(args) if args.dry_run else plan.main(args)
        if args.command == "run":
            if args.grid == "auto":
                args.grid = _auto_grid(args)
            return launch(_job(args, [args.script, *args.args]), dry_run=args.dry_run)
        if args.grid == "auto":
            raise ValueError("check compares one given grid with serial training; --grid auto is for run")
        return launch(_job(args, ["-m", "autopar.cli.check", *_check_argv(args)]), dry_run=args.dry_run)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"autopar {args.command}: error: {e}\n")
