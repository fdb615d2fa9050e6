"""Prefetching the depth (z) all-gathers of weights in execution order.

Each sharded layer needs its full (y, x) block, all-gathered over z, before its matmul. Issued
on demand, that gather sits on the critical path of every layer. The first forward records the
order in which layers really run (not the order in which they were registered: HF models build
heads before bodies, tied layers run twice...); from then on, while layer i computes, the
gather for layer i+1 is already in flight.

Safety: a prefetched block is used only if the weight has not changed since it was launched
(``param._version``, bumped by every in-place optimizer update); otherwise it is dropped and
gathered again. Nothing is prefetched across the end of the order, so no gather outlives the
forward that launched it by more than one layer. A layer that runs twice in one forward ends
the recording early: later layers then simply gather on demand.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..runtime.grid import Grid
from .comm import start_depth_gather


class Prefetcher:
    """Shared by the layers sharded in one ``auto_parallelize`` block."""

    def __init__(self) -> None:
        self.order: list[nn.Module] = []
        self.position: dict[int, int] = {}  # id(layer) -> index in order
        self.recording = True
        self.pending: dict[int, tuple[Tensor, Any, int]] = {}  # id(layer) -> (flat, work, version)
        self.hits = 0

    def __getstate__(self) -> dict:
        """Copies (``copy.deepcopy`` of a model) start without in-flight gathers."""
        return {**self.__dict__, "pending": {}}

    def gathered(self, layer: nn.Module, grid: Grid) -> Tensor | None:
        """The prefetched flat block of ``layer`` (or None), and launch the next layer's."""
        if self.recording:
            if id(layer) in self.position:
                self.recording = False
            else:
                self.position[id(layer)] = len(self.order)
                self.order.append(layer)
        flat = None
        entry = self.pending.pop(id(layer), None)
        if entry is not None:
            flat, work, version = entry
            work.wait()
            if version != layer.weight._version:
                flat = None
            else:
                self.hits += 1
        if not self.recording:
            self._launch_after(layer, grid)
        return flat

    def _launch_after(self, layer: nn.Module, grid: Grid) -> None:
        index = self.position.get(id(layer))
        if index is None or index + 1 >= len(self.order):
            return
        following = self.order[index + 1]
        if id(following) in self.pending:
            return
        flat, work = start_depth_gather(following.weight, grid, async_op=True)
        self.pending[id(following)] = (flat, work, following.weight._version)
