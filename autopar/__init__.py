"""autopar: train large PyTorch models on a pp x dp x z x y x x grid with no model changes.

The public names load on first use (PEP 562): ``autopar run`` and ``autopar --help`` need none of
them, and importing torch first would cost the launcher seconds before any rank starts.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import data
    from .checkpoint import (CheckpointError, from_pretrained, full_state_dict, load_checkpoint, resume,
                             save_checkpoint, save_pretrained, save_step)
    from .engine import Engine, parallelize
    from .intra_layer import auto_parallelize, vocab_parallel_cross_entropy
    from .offload import memory_report
    from .runtime import Grid, current_grid, destroy, init, shard_batch
    from .runtime.preempt import PreemptionHook

# Each public name and the module it comes from ("" for a subpackage of that name; any other
# subpackage, such as ``autopar.pipeline``, also loads on first attribute access, as it did when
# everything was imported eagerly).
_WHERE = {
    "CheckpointError": ".checkpoint", "from_pretrained": ".checkpoint", "full_state_dict": ".checkpoint",
    "load_checkpoint": ".checkpoint", "resume": ".checkpoint", "save_checkpoint": ".checkpoint",
    "save_pretrained": ".checkpoint", "save_step": ".checkpoint",
    "Engine": ".engine", "parallelize": ".engine",
    "auto_parallelize": ".intra_layer", "vocab_parallel_cross_entropy": ".intra_layer",
    "memory_report": ".offload",
    "Grid": ".runtime", "current_grid": ".runtime", "destroy": ".runtime", "init": ".runtime",
    "shard_batch": ".runtime",
    "PreemptionHook": ".runtime.preempt",
    "data": "",
}
__all__ = ["CheckpointError", "Engine", "Grid", "PreemptionHook", "auto_parallelize", "current_grid", "data",
           "destroy", "from_pretrained", "full_state_dict", "init", "load_checkpoint", "memory_report", "parallelize",
           "resume", "save_checkpoint", "save_pretrained", "save_step", "shard_batch", "vocab_parallel_cross_entropy"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where:
        value = getattr(importlib.import_module(where, __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a subpackage: autopar.pipeline, ...
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'autopar' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
