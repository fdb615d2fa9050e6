"""Launcher detection, process groups, the Grid, device choice and seeding."""
from .batch import shard_batch
from .grid import AXES, TP_AXES, Grid
from .state import current_grid, destroy, init, is_initialized

__all__ = ["AXES", "TP_AXES", "Grid", "current_grid", "destroy", "init", "is_initialized", "shard_batch"]
