"""Tags on parameters that tell gradient sync and clipping which ranks a parameter spans.

The gradient contract: every rank back-propagates ``local_mean_loss / (M * dp * z)``, so the
serial gradient of a parameter is the plain SUM of the per-rank gradients over the ranks that
hold a copy of it and saw different data. Two tags describe a parameter:

* ``grad_axes``: axes over which its gradient must be summed after backward. An untagged
  parameter is replicated everywhere and sees a different batch slice on every ``dp`` and ``z``
  coordinate, hence ``("dp", "z")``. A layer that already sums over ``z`` inside backward (the
  reduce-scatter of a depth-sharded weight) tags ``("dp",)``.
* ``shard_axes``: axes over which the parameter is *partitioned*; the squared norm is summed
  over these and counted once elsewhere.

A parameter that is a second copy of one counted elsewhere (a tied weight living on two pipeline
stages) is tagged ``norm_duplicate`` so clipping does not count it twice.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from .grid import AXES, Grid

DEFAULT_GRAD_AXES: tuple[str, ...] = ("dp", "z")


def _axes(axes: Iterable[str]) -> tuple[str, ...]:
    axes = tuple(axes)
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise ValueError(f"unknown axes {bad}; the axes are {AXES}")
    return tuple(a for a in AXES if a in axes)


def set_grad_axes(param: torch.Tensor, axes: Iterable[str]) -> None:
    param._autopar_grad_axes = _axes(axes)


def grad_axes(param: torch.Tensor) -> tuple[str, ...]:
    return getattr(param, "_autopar_grad_axes", DEFAULT_GRAD_AXES)


def set_shard_axes(param: torch.Tensor, axes: Iterable[str]) -> None:
    param._autopar_shard_axes = _axes(axes)


def shard_axes(param: torch.Tensor) -> tuple[str, ...]:
    return getattr(param, "_autopar_shard_axes", ())


def mark_norm_duplicate(param: torch.Tensor) -> None:
    param._autopar_norm_duplicate = True


def is_norm_duplicate(param: torch.Tensor) -> bool:
    return getattr(param, "_autopar_norm_duplicate", False)


def global_grad_norm(params: Iterable[torch.Tensor], grid: Grid) -> torch.Tensor:
    """The serial model's gradient 2-norm, as a 0-d tensor on every rank, without host syncs.

    Squares are summed per class of ``shard_axes`` and all-reduced over exactly those axes, then
    summed over pipeline stages (each stage owns distinct parameters).
    """
    by_axes: dict[tuple[str, ...], list[torch.Tensor]] = {}
    dtype = torch.float32  # at least; float64 gradients keep float64, or clipping rounds them
    for p in params:
        if p.grad is not None and not is_norm_duplicate(p):
            by_axes.setdefault(shard_axes(p), []).append(p.grad)
            dtype = torch.promote_types(dtype, p.grad.dtype)
    total = torch.zeros((), device=grid.device, dtype=dtype)
    for axes in sorted(by_axes):
        grads = by_axes[axes]
        sq = torch.stack(torch._foreach_norm(grads)).to(dtype).square().sum() if grads else total * 0
        if axes and grid.size(*axes) > 1:
            dist.all_reduce(sq, group=grid.group(*axes))
        total = total + sq
    if grid.sizes["pp"] > 1:
        dist.all_reduce(total, group=grid.group("pp"))
    return total.sqrt()


def clip_coefficient(params: Iterable[torch.Tensor], max_norm: float, grid: Grid) -> torch.Tensor:
    """The factor ``torch.nn.utils.clip_grad_norm_`` would scale the serial model's gradients
    by, as a 0-d tensor on the device. The stepper applies it where the gradients are: on the
    device, or on the host copies when they were handed to a CPU step early (scaling an fp32
    copy gives the same numbers as scaling on the device and copying)."""
    norm = global_grad_norm(params, grid)
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)
