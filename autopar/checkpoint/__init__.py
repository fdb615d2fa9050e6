"""Checkpoints: full state dicts now; sharded save, reshard on load and HF export to come."""
from .full_state import full_state_dict

__all__ = ["full_state_dict"]
