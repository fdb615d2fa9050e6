"""``autopar check``: the correctness contract, run on the user's own machine and model.

Every rank builds the model twice from the same seed: once under the grid (``auto_parallelize``
when x*y*z > 1, then ``autopar.parallelize``) and once serially. Both take the same AdamW steps
on the same seeded global batch; then the grid's weights, gathered with ``full_state_dict``, are
compared tensor by tensor with the serial ones. A step on any grid must equal the serial step up
to summation order, so a table with a large error points at the layer (or the cluster's
communication stack) that breaks it. Run on every rank by ``autopar check``:

    python -m autopar.cli.check --model llama      # under a launcher, with AUTOPAR_GRID set

Why the error is measured against each tensor's own update, ``||W - W_serial|| / ||W_serial -
W_0||``: AdamW divides by the root of the squared gradient, so summation noise on a small
gradient becomes an lr-sized step, and an absolute bound gives false alarms (CLIP at 1e-5) where
nothing is wrong. Relative to the update, fp32 noise stays below ``BOUND[fp32]``; with ``--fp64``
both sides run in float64, noise drops below 1e-12 and a real error stands orders of magnitude
above ``BOUND[fp64]``. A tensor whose serial update is below ``ZERO_GRAD_FLOOR`` per element has an
identically zero gradient (attention key biases: softmax ignores a shift of every score); it
moved by rounding alone and is judged by its absolute error against that floor.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

import autopar
from autopar.engine import _call_model
from autopar.runtime.batch import map_tensors

from . import models
from .options import add_check_arguments

BOUND = {torch.float32: 1e-3, torch.float64: 1e-9}  # ||W - W_serial|| / ||W_serial - W_0||
ZERO_GRAD_FLOOR = 1e-6  # times lr, per element: updates below it come from rounding only
LOSS_RTOL = 1e-5


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


def error_rows(parallel: dict[str, torch.Tensor], serial: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
               bound: float, floor: float) -> list[tuple[str, tuple[int, ...], float, float, bool]]:
    """(name, shape, largest abs error, error relative to the update, within ``bound``); for
    zero-gradient tensors (update below ``floor`` per element, name marked) the error relative
    to that floor, which must stay <= 1."""
    if parallel.keys() != serial.keys():
        raise AssertionError(f"the grid's state names differ from the serial model's: {sorted(parallel.keys() ^ serial.keys())}")
    rows = []
    for name, ref in serial.items():
        got, ref = parallel[name].double(), ref.detach().double()
        err = got - ref
        update = (ref - initial[name].double()).norm().item()
        noise = floor * max(ref.numel(), 1) ** 0.5
        largest = err.abs().max().item() if err.numel() else 0.0
        if not ref.is_floating_point() or update < noise:
            rel = err.norm().item() / noise
            rows.append((f"{name} (zero gradient)" if ref.is_floating_point() else name, tuple(ref.shape),
                         largest, rel, rel <= 1))
        else:
            rel = err.norm().item() / update
            rows.append((name, tuple(ref.shape), largest, rel, rel <= bound))
    return rows


def format_table(rows: list[tuple[str, tuple[int, ...], float, float, bool]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'tensor':<{width}}  {'shape':>14}  {'max abs err':>11}  {'err/update':>11}  ok"]
    for name, shape, abs_err, rel_err, ok in rows:
        lines.append(f"{name:<{width}}  {str(list(shape)):>14}  {abs_err:11.2e}  {rel_err:11.2e}  "
                     f"{'yes' if ok else 'NO'}")
    return "\n".join(lines)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def check(args: argparse.Namespace) -> bool:
    """Run the check on this rank (inside ``autopar.init``'s world); True when within the bound."""
    grid = autopar.current_grid()
    dtype = torch.float64 if args.fp64 else torch.float32
    bound = args.bound if args.bound is not None else BOUND[dtype]
    with _default_dtype(dtype):
        torch.manual_seed(args.seed)
        serial, batch, loss_fn = _build(args)
        torch.manual_seed(args.seed)
        with autopar.auto_parallelize() if grid.size("x", "y", "z") > 1 else contextlib.nullcontext():
            parallel = _build(args)[0]
        micro = args.microbatches or grid.sizes["pp"]
        if batch is None:
            batch = models.make_batch(serial, args.global_batch or 2 * grid.batch_shards * micro)
    serial, parallel = serial.to(dtype), parallel.to(dtype)  # a factory may fix its own dtype
    batch = map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)
    initial = {k: v.detach().clone() for k, v in serial.state_dict().items()}
    built_exact = all(torch.equal(a, b) for a, b in zip(autopar.full_state_dict(parallel).values(), initial.values()))
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
    rows = error_rows(autopar.full_state_dict(engine), serial.state_dict(), initial, bound, ZERO_GRAD_FLOOR * args.lr)
    # The weights are the verdict; losses only catch a wrong objective. HF computes its losses
    # on fp32 logits even in float64, hence one loss bound for both dtypes.
    losses_ok = all(math.isclose(g, r, rel_tol=LOSS_RTOL, abs_tol=LOSS_RTOL) for g, r in losses)
    ok = torch.tensor([float(losses_ok and built_exact and all(r[4] for r in rows))], device=grid.device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # one verdict, and one exit code, on every rank
    if grid.rank == 0:
        name = args.factory or args.model
        print(f"\nautopar check: {name}, {args.steps} AdamW steps on {len(batch_of(batch))} samples, "
              + " ".join(f"{a}={n}" for a, n in grid.sizes.items()) + f" vs serial, {str(dtype)[6:]}")
        print(f"construction: {'bit-identical to serial' if built_exact else 'DIFFERS from serial'}")
        for i, (g, r) in enumerate(losses, 1):
            print(f"step {i}: loss {g:.8f} (grid)  {r:.8f} (serial)  diff {abs(g - r):.2e}")
        print(format_table(rows))
        real = [r for r in rows if not r[0].endswith("(zero gradient)")] or rows
        worst = max(real, key=lambda r: r[3])
        print(f"{'PASS' if ok.item() else 'FAIL'}: largest error relative to the update {worst[3]:.2e} "
              f"({worst[0]}); bound {bound:g}" + ("" if losses_ok else f"; losses differ beyond {LOSS_RTOL:g}"),
              flush=True)
    return bool(ok.item())


def batch_of(batch: Any) -> Any:
    """The first tensor of a batch, to report its size."""
    if isinstance(batch, dict):
        return next(iter(batch.values()))
    return batch_of(batch[0]) if isinstance(batch, (tuple, list)) else batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autopar.cli.check", description=__doc__.split("\n\n")[0])
    add_check_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # many ranks per machine; the tiny models gain nothing from threads
    autopar.init(seed=args.seed)
    try:
        return 0 if check(args) else 1
    finally:
        autopar.destroy()


if __name__ == "__main__":
    sys.exit(main())
