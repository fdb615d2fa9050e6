"""Checkpoints: full state dicts, sharded save with reshard on load, Hugging Face export.

Depends only on ``runtime``: what a rank holds is read from duck-typed attributes (a
parameter's ``_autopar_spec`` and tags, a module's ``_autopar_absent``, the engine's optimizer,
stepper and buckets), so no parallel axis is imported here.
"""
from .full_state import full_state_dict
from .hf import save_pretrained
from .local import remember_aliases
from .load import load_checkpoint
from .pretrained import from_pretrained
from .steps import resume, save_step
from .save import PendingSave, save_checkpoint
from .storage import CheckpointError

__all__ = ["CheckpointError", "PendingSave", "from_pretrained", "full_state_dict", "load_checkpoint", "remember_aliases",
           "resume", "save_checkpoint", "save_pretrained", "save_step"]
