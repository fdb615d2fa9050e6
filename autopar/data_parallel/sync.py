"""Gradient sync after backward: one coalesced all-reduce per group of axes.

Each parameter says over which axes its gradient is summed (``runtime.params.grad_axes``).
Parameters that share those axes are flattened into one buffer so a model costs a handful of
collectives, not one per tensor.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..runtime.grid import Grid
from ..runtime.params import grad_axes


def allreduce_grads(params: Iterable[torch.nn.Parameter], grid: Grid) -> None:
    by_axes: dict[tuple[str, ...], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_axes.setdefault(grad_axes(p), []).append(p.grad)
    for axes in sorted(by_axes):
        if not axes or grid.size(*axes) == 1:
            continue
        grads = by_axes[axes]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=grid.group(*axes))
        torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))
