"""Data parallelism: gradient buckets reduced from backward hooks, no_sync, optional ZeRO-1/2."""
from .buckets import GradBuckets, check_options
from .sync import allreduce_grads

__all__ = ["GradBuckets", "allreduce_grads", "check_options"]
