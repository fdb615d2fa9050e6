"""offload: not implemented yet."""
