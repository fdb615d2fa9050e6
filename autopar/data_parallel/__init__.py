"""Data parallelism: gradient buckets reduced from backward hooks, no_sync, optional ZeRO-1/2."""
from .buckets import GradBuckets, check_options

__all__ = ["GradBuckets", "check_options"]
