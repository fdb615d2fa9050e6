"""Data parallelism: summing gradients over the ranks that replicate a parameter."""
from .sync import allreduce_grads

__all__ = ["allreduce_grads"]
