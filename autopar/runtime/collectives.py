"""Flat collectives under the names every supported torch release has.

torch 2.13 added ``all_gather_single`` / ``reduce_scatter_single``; ``all_gather_into_tensor`` /
``reduce_scatter_tensor`` (torch >= 2.0) take the same arguments in the same order. autopar
declares ``torch>=2.4`` and setup keeps a CUDA torch it finds, so every axis's communication
helpers take these two from here instead of naming either spelling themselves.

The two are looked up in ``torch.distributed`` at each call, not bound at import: while autopar
is initialised, ``runtime.diagnostics`` wraps torch.distributed's collectives to record them
(the hang report), and a function bound at import would bypass the recorder.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


def all_gather_flat(*args: Any, **kwargs: Any) -> Any:
    """``all_gather_single`` / ``all_gather_into_tensor``: (output, input, group=, async_op=)."""
    return getattr(dist, _GATHER)(*args, **kwargs)


def reduce_scatter_flat(*args: Any, **kwargs: Any) -> Any:
    """``reduce_scatter_single`` / ``reduce_scatter_tensor``: (output, input, op=, group=, async_op=)."""
    return getattr(dist, _SCATTER)(*args, **kwargs)
