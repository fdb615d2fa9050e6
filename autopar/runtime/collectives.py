"""Flat collectives under the names every supported torch release has.

torch 2.13 added ``all_gather_single`` / ``reduce_scatter_single``; ``all_gather_into_tensor`` /
``reduce_scatter_tensor`` (torch >= 2.0) take the same arguments in the same order. autopar
declares ``torch>=2.4`` and setup keeps a CUDA torch it finds, so every axis's communication
helpers take these two from here instead of naming either spelling themselves.
"""
from __future__ import annotations

import torch.distributed as dist

all_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
