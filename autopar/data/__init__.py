"""Data loading for autopar: each rank gets exactly its ``shard_batch`` share of every global
batch, deterministically and resumably from a step count, with an optional local shuffle that
saves I/O on datasets too big to shuffle globally.

- ``GlobalBatchSampler`` (``sampler.py``): the per-step indices of this rank.
- ``loader`` (``loader.py``): a ``DataLoader`` using it.
- ``order.py``: the pure (seed, epoch) index math both rest on.
"""
from .loader import loader
from .sampler import GlobalBatchSampler

__all__ = ["GlobalBatchSampler", "loader"]
