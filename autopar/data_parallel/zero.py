"""ZeRO stages 1 and 2 on top of the gradient buckets: the optimizer steps 1/n of each bucket.

Every rank of a bucket's group holds the same parameters after reduction, so stepping the whole
bucket on every rank is n-fold redundant work and state. Instead each bucket's parameters are
moved into one flat buffer (the model's parameters become views into it), and rank r of the
group owns the contiguous slice ``[r*S, (r+1)*S)`` of that buffer: its optimizer is built on
these flat slices only, so optimizer state per rank drops by n (the group spans dp, and z for
parameters that are not depth-sharded already, so n >= dp).

* ``zero=1``: the bucket is all-reduced as usual and the optimizer reads its slice of it.
* ``zero=2``: the bucket is reduce-scattered straight into a slice-sized gradient buffer (half
  the bytes of an all-reduce), and the full bucket is freed until the next step, so gradient
  memory at the optimizer step is 1/n too.

After the step the updated slices are all-gathered in place into the flat buffer, so every
replica's parameters are whole again. Together, reduce-scatter + all-gather move exactly the
bytes of one all-reduce.

Why only elementwise optimizers: a flat slice cuts through tensors and mixes several of them,
which is exact only when the update of each element depends on that element alone (SGD, Adam,
AdamW, ...). Optimizers with per-tensor statistics (LAMB's trust ratio, Adafactor's factored
moments, LARS) would compute them over the wrong set of elements, so they are rejected. For the
same reason the factory receives flat 1-D tensors: parameter groups keyed on names or shapes
(such as "no weight decay for biases") cannot be expressed and are not supported with ZeRO.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..runtime.params import is_norm_duplicate, mark_norm_duplicate, set_shard_axes, shard_axes
from .comm import all_gather_params
from .layout import Bucket

ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.RMSprop)


def shard_buckets(buckets: Sequence[Bucket], zero: int) -> None:
    """Move each bucket's parameters into a flat buffer and create this rank's shard of it as
    the parameter the optimizer will own, with its gradient slot wired for ``zero``."""
    for bucket in buckets:
        like = bucket.params[0]
        flat = torch.zeros(bucket.numel, dtype=like.dtype, device=like.device)
        for p, off in zip(bucket.params, bucket.offsets):
            view = flat[off:off + p.numel()]
            view.copy_(p.detach().reshape(-1))
            p.data = view.view_as(p)
        bucket.flat_param = flat
        shard = nn.Parameter(bucket.shard(flat))  # aliases flat: the step updates it in place
        # The shard is partitioned over the bucket's group on top of the parameters' own sharding;
        # these tags make the global gradient norm count it exactly once (runtime.params).
        set_shard_axes(shard, bucket.axes + shard_axes(like))
        if is_norm_duplicate(like):
            mark_norm_duplicate(shard)
        bucket.shard_grad = bucket.shard(bucket.grad) if zero == 1 else \
            torch.zeros(bucket.shard_numel, dtype=like.dtype, device=like.device)
        shard.grad = bucket.shard_grad
        bucket.shard_param = shard


def check_elementwise(optimizer: torch.optim.Optimizer) -> None:
    if type(optimizer) not in ELEMENTWISE_OPTIMIZERS:
        names = ", ".join(o.__name__ for o in ELEMENTWISE_OPTIMIZERS)
        raise ValueError(
            f"zero=1/2 steps flat slices that cut across tensors, which is exact only for elementwise "
            f"optimizers ({names}); {type(optimizer).__name__} may use per-tensor statistics. "
            "Use zero=0 with it")


def gather_params(buckets: Sequence[Bucket]) -> None:
    """All-gather every bucket's updated shard into its flat buffer, in place; all launched
    before the first wait so they overlap each other. The parameters are views of that buffer
    whose version counters the collective does not bump, so they are bumped here: whatever
    tells a changed weight by its ``_version`` (autograd's saved-tensor check, the depth
    prefetcher) sees the update as it sees any optimizer's in-place step."""
    handles = [all_gather_params(b.flat_param, b.shard_param.detach(), b.group)
               for b in buckets]
    for handle in handles:
        handle.wait()
    for bucket in buckets:
        for p in bucket.params:
            torch.autograd.graph.increment_version(p)
