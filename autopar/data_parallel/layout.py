"""Which parameters share a gradient bucket, and the bucket itself.

Kept apart from ``buckets.py`` (which drives the reduction during backward) because the layout
is pure bookkeeping: a plan is a function of the parameters' order, tags, dtypes and a byte cap,
and a ``Bucket`` is one flat buffer with the views into it. Both are the same on every rank by
construction, which is what lets every rank issue the same collectives in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.params import grad_axes, is_norm_duplicate, shard_axes


@dataclass(eq=False)
class Bucket:
    """One flat gradient buffer over a run of parameters that share a process group.

    ``numel`` is padded to a multiple of the group size so the buffer splits into equal shards
    (ZeRO, reduce-scatter); the padding stays zero.
    """

    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    axes: tuple[str, ...]
    group: dist.ProcessGroup
    world: int
    rank: int
    grad: torch.Tensor | None = None
    seen: list[bool] = field(default_factory=list)      # produced a gradient in any backward
    arrived: list[bool] = field(default_factory=list)   # produced it in the syncing backward
    ready: int = 0
    handle: dist.Work | None = None
    # ZeRO only: the flat parameter buffer, and this rank's slices of it and of the gradient
    flat_param: torch.Tensor | None = None
    shard_param: nn.Parameter | None = None
    shard_grad: torch.Tensor | None = None

    @property
    def shard_numel(self) -> int:
        return self.numel // self.world

    def shard(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous 1/world slice of a flat buffer laid out like the bucket."""
        return flat[self.rank * self.shard_numel:(self.rank + 1) * self.shard_numel]

    def allocate_grad(self) -> None:
        """A zeroed flat buffer, and every parameter's ``.grad`` made a view into it. Keeping
        ``.grad`` defined is what makes autograd accumulate *into* the buffer instead of
        installing a fresh tensor."""
        like = self.params[0]
        self.grad = torch.zeros(self.numel, dtype=like.dtype, device=like.device)
        self.attach_grads()

    def attach_grads(self) -> None:
        """Point every ``.grad`` (and the ZeRO shard's) back at the buffer: the optimizer wrapper
        may have set them to None."""
        for p, off in zip(self.params, self.offsets):
            p.grad = self.grad[off:off + p.numel()].view_as(p)
        if self.shard_param is not None:
            self.shard_param.grad = self.shard_grad

    def attach_grads_to_shard(self) -> None:
        """zero=2 between steps: no full buffer; the optimizer's shard gradient stays wired."""
        for p in self.params:
            p.grad = None
        self.shard_param.grad = self.shard_grad

    def reset(self) -> None:
        self.seen = [False] * len(self.params)
        self.arrived = [False] * len(self.params)
        self.ready = 0


def _bucket_key(p: nn.Parameter, zero: int, last: set[int]) -> tuple:
    """Parameters in one bucket must reduce over the same group with the same dtype, and be
    launched at the same time. Under ZeRO a bucket shard becomes one optimizer parameter whose
    norm is counted by its tags, so the norm tags must agree as well."""
    key: tuple = (grad_axes(p), p.dtype, p.device, id(p) in last)
    return key + (shard_axes(p), is_norm_duplicate(p)) if zero else key


def plan_buckets(order: Sequence[nn.Parameter], zero: int, cap_bytes: int, last: set[int]) -> list[list[nn.Parameter]]:
    """Pack parameters, given in the order their gradients are expected, into buckets that are
    closed as soon as they reach ``cap_bytes`` (as DDP and Megatron do: every bucket but the last
    of a kind is at least the cap, so a model costs as few collectives as the cap allows); return
    them sorted by the position of their last parameter, i.e. by when they should be complete.
    The parameters in ``last`` are moved behind all others."""
    order = [p for p in order if id(p) not in last] + [p for p in order if id(p) in last]
    open_: dict[tuple, list[nn.Parameter]] = {}
    open_bytes: dict[tuple, int] = {}
    last_pos: dict[tuple, int] = {}
    closed: list[tuple[int, list[nn.Parameter]]] = []
    for pos, p in enumerate(order):
        key = _bucket_key(p, zero, last)
        size = p.numel() * p.element_size()
        if key not in open_:
            open_[key], open_bytes[key] = [], 0
        open_[key].append(p)
        open_bytes[key] += size
        last_pos[key] = pos
        if open_bytes[key] >= cap_bytes:
            closed.append((pos, open_.pop(key)))
    closed.extend((last_pos[key], ps) for key, ps in open_.items())
    return [ps for _, ps in sorted(closed, key=lambda c: c[0])]
