"""pipeline: not implemented yet."""
