"""Launcher detection, process groups, the Grid, device choice and seeding.

The grid's names load on first use (PEP 562), so that ``runtime.gridspec`` (sizes and their
text form, which the launcher needs) is importable without torch.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .gridspec import AXES, TP_AXES

if TYPE_CHECKING:
    from .batch import shard_batch
    from .grid import Grid
    from .state import current_grid, destroy, init, is_initialized

_WHERE = {"shard_batch": ".batch", "Grid": ".grid", "current_grid": ".state", "destroy": ".state", "init": ".state",
          "is_initialized": ".state"}
__all__ = ["AXES", "TP_AXES", "Grid", "current_grid", "destroy", "init", "is_initialized", "shard_batch"]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is not None:
        value = getattr(importlib.import_module(where, __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a module: runtime.state, ...
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'autopar.runtime' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
