"""The data-parallel axis's collectives: gradient reduction and ZeRO's parameter all-gather.

Every one is asynchronous and returns its ``Work``: buckets launch while backward still runs,
and the engine waits for them only before the optimizer step (``GradBuckets.finish``). The
gradient syncs are plain sums; the mean over microbatches and replicas is already in the
loss's weights (``runtime.loss_weights``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..runtime.collectives import all_gather_flat, reduce_scatter_flat


def all_reduce_grads(flat: torch.Tensor, group: dist.ProcessGroup) -> dist.Work:
    """zero 0/1: every replica ends with the summed flat gradient of a bucket."""
    return dist.all_reduce(flat, group=group, async_op=True)


def reduce_scatter_grads(shard: torch.Tensor, flat: torch.Tensor, group: dist.ProcessGroup) -> dist.Work:
    """zero=2: each replica ends with the sum of its own shard of the bucket's gradient."""
    return reduce_scatter_flat(shard, flat, group=group, async_op=True)


def all_gather_params(flat: torch.Tensor, shard: torch.Tensor, group: dist.ProcessGroup) -> dist.Work:
    """zero 1/2 after the step: every replica's updated shard into the full flat parameters."""
    return all_gather_flat(flat, shard, group=group, async_op=True)
