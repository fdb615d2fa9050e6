"""``autopar check``: the correctness contract, run on the user's own machine and model.

Every rank builds the model twice from the same seed: once under the grid (``auto_parallelize``
when x*y*z > 1, then ``autopar.parallelize``) and once serially. Both take the same AdamW steps
on the same seeded global batch; then the grid's weights, gathered with ``full_state_dict``, are
compared tensor by tensor with the serial ones. A step on any grid must equal the serial step to
fp32 summation-order tolerance, so a table with a large error points at the layer (or the
cluster's communication stack) that breaks it. Run on every rank by ``autopar check``:

    python -m autopar.cli.check --model llama      # under a launcher, with AUTOPAR_GRID set
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import autopar
from autopar.engine import _call_model

from . import models

# torch.testing's fp32 tolerances: |parallel - serial| <= ATOL + RTOL * |serial|, elementwise.
RTOL, ATOL = 1.3e-6, 1e-5


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", default="gpt2", choices=models.FAMILIES, help="tiny model of this family")
    what.add_argument("--factory", metavar="MODULE:FUNCTION",
                      help="your model: FUNCTION() returns a model (HF: the batch comes from its config), or "
                           "(model, global_batch) or (model, global_batch, loss_fn)")
    p.add_argument("--steps", type=int, default=3, help="AdamW steps on both models")
    p.add_argument("--global-batch", type=int, default=None, help="default: 2 per batch shard and microbatch")
    p.add_argument("--microbatches", type=int, default=None, help="per rank and step; default pp")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rtol", type=float, default=RTOL)
    p.add_argument("--atol", type=float, default=ATOL)


def _build(args: argparse.Namespace) -> tuple[nn.Module, Any, Callable | None]:
    """(model, global batch or None, loss_fn or None) from --model or --factory."""
    if args.factory is None:
        return models.build(args.model), None, None
    made = models.load_factory(args.factory)()
    made = made if isinstance(made, tuple) else (made,)
    if not isinstance(made[0], nn.Module) or len(made) > 3:
        raise TypeError(f"--factory {args.factory} must return a model, (model, batch) or (model, batch, loss_fn)")
    return made[0], made[1] if len(made) > 1 else None, made[2] if len(made) > 2 else None


def _optimizer(lr: float) -> Callable:
    # eps=1e-5, not 1e-8: attention key biases have an identically zero gradient (softmax ignores a
    # per-row shift), so both runs hold ~1e-9 rounding noise there that a tiny eps turns into
    # lr-sized, order-dependent updates.
    return lambda params: torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=0.01)


def error_rows(parallel: dict[str, torch.Tensor], serial: dict[str, torch.Tensor],
               rtol: float, atol: float) -> list[tuple[str, tuple[int, ...], float, float, bool]]:
    """(name, shape, largest abs error, largest abs error / largest |serial|, within tolerance)."""
    if parallel.keys() != serial.keys():
        raise AssertionError(f"the grid's state names differ from the serial model's: {sorted(parallel.keys() ^ serial.keys())}")
    rows = []
    for name, ref in serial.items():
        got, ref = parallel[name].double(), ref.detach().double()
        err = (got - ref).abs()
        scale = ref.abs().max().item() if ref.numel() else 0.0
        ok = bool((err <= atol + rtol * ref.abs()).all())
        rows.append((name, tuple(ref.shape), err.max().item() if err.numel() else 0.0,
                     err.max().item() / scale if scale else 0.0, ok))
    return rows


def format_table(rows: list[tuple[str, tuple[int, ...], float, float, bool]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'tensor':<{width}}  {'shape':>14}  {'max abs err':>11}  {'max rel err':>11}  ok"]
    for name, shape, abs_err, rel_err, ok in rows:
        lines.append(f"{name:<{width}}  {str(list(shape)):>14}  {abs_err:11.2e}  {rel_err:11.2e}  "
                     f"{'yes' if ok else 'NO'}")
    return "\n".join(lines)


def check(args: argparse.Namespace) -> bool:
    """Run the check on this rank (inside ``autopar.init``'s world); True when within tolerance."""
    grid = autopar.current_grid()
    torch.manual_seed(args.seed)
    serial, batch, loss_fn = _build(args)
    torch.manual_seed(args.seed)
    with autopar.auto_parallelize() if grid.size("x", "y", "z") > 1 else contextlib.nullcontext():
        parallel = _build(args)[0]
    built_exact = all(torch.equal(a, b) for a, b in zip(autopar.full_state_dict(parallel).values(),
                                                        serial.state_dict().values()))
    micro = args.microbatches or grid.sizes["pp"]
    if batch is None:
        batch = models.make_batch(serial, args.global_batch or 2 * grid.batch_shards * micro)
    engine = autopar.parallelize(parallel, optimizer=_optimizer(args.lr), num_microbatches=micro,
                                 loss_fn=loss_fn)
    serial_opt = _optimizer(args.lr)(serial.parameters())
    losses = []
    for _ in range(args.steps):
        got = engine.step(autopar.shard_batch(batch))
        serial.train()
        out = _call_model(serial, batch)
        ref = loss_fn(out, batch) if loss_fn else out.loss
        ref.backward()
        serial_opt.step()
        serial_opt.zero_grad()
        losses.append((got, ref.item()))
    rows = error_rows(autopar.full_state_dict(engine), serial.state_dict(), args.rtol, args.atol)
    losses_ok = all(math.isclose(g, r, rel_tol=args.rtol, abs_tol=args.atol) for g, r in losses)
    ok = torch.tensor([float(losses_ok and built_exact and all(r[4] for r in rows))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # one verdict, and one exit code, on every rank
    if grid.rank == 0:
        name = args.factory or args.model
        print(f"\nautopar check: {name}, {args.steps} AdamW steps on {len(batch_of(batch))} samples, "
              + " ".join(f"{a}={n}" for a, n in grid.sizes.items()) + " vs serial")
        print(f"construction: {'bit-identical to serial' if built_exact else 'DIFFERS from serial'}")
        for i, (g, r) in enumerate(losses, 1):
            print(f"step {i}: loss {g:.8f} (grid)  {r:.8f} (serial)  diff {abs(g - r):.2e}")
        print(format_table(rows))
        worst = max(rows, key=lambda r: r[3])
        print(f"{'PASS' if ok.item() else 'FAIL'}: largest relative error {worst[3]:.2e} ({worst[0]}); "
              f"tolerance |err| <= {args.atol:g} + {args.rtol:g} * |serial|", flush=True)
    return bool(ok.item())


def batch_of(batch: Any) -> Any:
    """The first tensor of a batch, to report its size."""
    if isinstance(batch, dict):
        return next(iter(batch.values()))
    return batch_of(batch[0]) if isinstance(batch, (tuple, list)) else batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autopar.cli.check", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # many ranks per machine; the tiny models gain nothing from threads
    autopar.init(seed=args.seed)
    try:
        return 0 if check(args) else 1
    finally:
        autopar.destroy()


if __name__ == "__main__":
    sys.exit(main())
