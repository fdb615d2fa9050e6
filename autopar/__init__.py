"""autopar: train large PyTorch models on a pp x dp x z x y x x grid with no model changes."""
from . import data
from .checkpoint import (CheckpointError, from_pretrained, full_state_dict, load_checkpoint, resume, save_checkpoint,
                         save_pretrained, save_step)
from .engine import Engine, parallelize
from .intra_layer import auto_parallelize, vocab_parallel_cross_entropy
from .offload import memory_report
from .runtime import Grid, current_grid, destroy, init, shard_batch
from .runtime.preempt import PreemptionHook

__all__ = ["CheckpointError", "Engine", "Grid", "PreemptionHook", "auto_parallelize", "current_grid", "data",
           "destroy", "from_pretrained", "full_state_dict", "init", "load_checkpoint", "memory_report", "parallelize",
           "resume", "save_checkpoint", "save_pretrained", "save_step", "shard_batch", "vocab_parallel_cross_entropy"]
__version__ = "0.1.0"
