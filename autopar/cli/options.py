"""Every command-line option of ``autopar`` and of its per-rank entry point, in one module that
imports neither torch nor the commands themselves.

Why apart from the commands: ``autopar run`` parses its line, checks the grid and starts the
launcher; building the parser must not import the ``check`` and ``plan`` machinery (torch,
transformers: seconds on a login node, paid before any rank starts). The commands import these
definitions instead, so each option is written once.
"""
from __future__ import annotations

import argparse
import shlex

from ..runtime.gridspec import parse_grid
from .launch import LAUNCHERS

FAMILIES = ("gpt2", "llama", "opt", "gpt-neo", "gptj", "bert", "electra", "vit", "whisper")
"""The model families ``check`` and ``plan`` build (``cli.models``)."""


def grid_option(text: str) -> dict[str, int] | str:
    if text.strip() == "auto":
        return "auto"
    try:
        return parse_grid(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_launch_arguments(p: argparse.ArgumentParser, nprocs_required: bool) -> None:
    p.add_argument("-n", "--nprocs", type=int, required=nprocs_required, default=None,
                   help="ranks in all" + ("" if nprocs_required else " (default: the grid's product)"))
    p.add_argument("--nodes", type=int, default=1, help="nodes the ranks spread over (evenly)")
    p.add_argument("--grid", type=grid_option, default={}, help="e.g. pp=2,dp=2,x=2; passed to autopar.init() "
                   "as AUTOPAR_GRID; dp is inferred when left out")
    p.add_argument("--launcher", choices=LAUNCHERS, default="auto",
                   help="auto: srun inside a Slurm allocation, local processes on one node, torchrun on several")
    p.add_argument("--launcher-args", type=shlex.split, default=[],
                   help="extra flags for the launcher, one quoted string, e.g. '--overcommit'")
    p.add_argument("--master-addr", default=None, help="torchrun on several nodes: the rendezvous host")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--dry-run", action="store_true", help="print the launch command, start nothing")


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    """``autopar check``'s own options, which it forwards to every rank's ``autopar.cli.check``."""
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", default="gpt2", choices=FAMILIES, help="tiny model of this family")
    what.add_argument("--factory", metavar="MODULE:FUNCTION",
                      help="your model: FUNCTION() returns a model (HF: the batch comes from its config), or "
                           "(model, global_batch) or (model, global_batch, loss_fn)")
    p.add_argument("--steps", type=int, default=3, help="AdamW steps on both models")
    p.add_argument("--global-batch", type=int, default=None, help="default: 2 per batch shard and microbatch")
    p.add_argument("--microbatches", type=int, default=None, help="per rank and step; default pp")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fp64", action="store_true", help="both sides in float64: noise below 1e-12, bound 1e-9")
    p.add_argument("--bound", type=float, default=None,
                   help="largest ||W - W_serial|| / ||W_serial - W_0|| per tensor (default 1e-3, 1e-9 with --fp64)")


def _ranks(text: str) -> list[int]:
    try:
        return [int(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks {text!r}: expected rank numbers such as 0,4095") from None


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """``autopar plan``'s options, ``--dry-run``'s included."""
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", default="gpt2", help=f"a family, {', '.join(FAMILIES)}: its default "
                      "(full-size) transformers config (llama's is Llama-7B-shaped); or a Hugging Face "
                      "config.json, or a folder holding one")
    what.add_argument("--factory", metavar="MODULE:FUNCTION", help="FUNCTION() returns your model (built on meta)")
    p.add_argument("--world", type=int, required=True, help="ranks in the job")
    p.add_argument("--grid", type=grid_option, default={}, help="one grid, e.g. pp=2,x=2 (default: rank them all)")
    p.add_argument("--global-batch", type=int, default=8, help="sequences (samples) per step, all ranks")
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's positions, at most 1024")
    p.add_argument("--microbatches", type=int, default=None, help="per rank and step; default pp")
    p.add_argument("--top", type=int, default=10, help="grids shown when ranking")
    p.add_argument("--hardware", default=None, help="rank grids by predicted step time on this machine: "
                   "a100-80g, h100-80g, h200, cpu-gloo, or a JSON file of autopar.cli.cost.Hardware's fields")
    p.add_argument("--calibrate", action="store_true", help="measure this machine (matmul FLOP/s, 2-rank gloo "
                   "all-reduce) and rank grids on the measured figures")
    p.add_argument("--schedule", default="1f1b", help="pipeline schedule the step time assumes "
                   "(gpipe, 1f1b, interleaved with 2 virtual stages, zerobubble)")
    p.add_argument("--dry-run", action="store_true",
                   help="build the real set-up of --ranks on a fake world of --world ranks (meta tensors)")
    p.add_argument("--ranks", type=_ranks, default=None,
                   help="with --dry-run: ranks to build, e.g. 0,4095 (default: 0 and the last rank)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=0, help="with --dry-run: ZeRO stage")


def parser(doc: str) -> argparse.ArgumentParser:
    """The ``autopar`` command line; ``doc``: its description, then (after a blank line) examples."""
    p = argparse.ArgumentParser(prog="autopar", description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(doc.split("\n\n")[1:]))
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start a Python script on N ranks with the right launcher")
    add_launch_arguments(run, nprocs_required=True)
    run.add_argument("--model", default=None, help="with --grid auto: the model the planner ranks grids for "
                     "(a family of `autopar plan` or a Hugging Face config.json)")
    run.add_argument("--hardware", default=None, help="with --grid auto: a preset (h100, a100-80g, h200, cpu-gloo) "
                     "or a JSON file")
    run.add_argument("--global-batch", type=int, default=None, help="with --grid auto: sequences per step")
    run.add_argument("--seq-len", type=int, default=None, help="with --grid auto: tokens per sequence")
    run.add_argument("script", help="the Python script every rank runs")
    run.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    chk = sub.add_parser("check", help="train a tiny model on the grid and serially; print the errors")
    add_launch_arguments(chk, nprocs_required=False)
    add_check_arguments(chk)
    pln = sub.add_parser("plan", help="predicted memory and communication per rank (shape only)")
    add_plan_arguments(pln)
    return p
