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

from . import options
from .launch import Job, launch


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
    p = options.parser(__doc__)
    args = p.parse_args(argv)
    try:
        if args.command == "plan":
            from . import dry_run, plan  # torch and transformers: only for the command that needs them

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
