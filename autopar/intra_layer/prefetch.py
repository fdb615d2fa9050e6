"""Prefetching the depth (z) all-gathers of weights in execution order.

Each sharded layer needs its full (y, x) block, all-gathered over z, before its matmul. Issued
on demand, that gather sits on the critical path of every layer. The first forward records the
order in which layers really run (not the order in which they were registered: HF models build
heads before bodies, tied layers run twice...); from then on, while layer i computes, the
gather for layer i+1 is already in flight.

Safety: a prefetched block belongs to the one layer call that comes next. If the next gather
asked for is any other layer's, the prefetch is dropped and gathered again on demand. The
weight's ``_version`` alone cannot tell a stale block: ZeRO rewrites parameters through views
of its flat buffer, and a forward recomputed inside backward (activation recompute) prefetches
for a layer whose backward is already done, whose next call is then the *next step's* forward,
after the optimizer step. With the next-call rule such a prefetch meets the next step's first
layer instead and is dropped; the version check (``param._version``, bumped by in-place updates,
and by ZeRO's parameter all-gather) remains for a forward that ends after layer i while the next
one starts at i+1. At most one gather is ever in flight, and nothing is prefetched across the
end of the order. A layer that runs twice in one forward ends the recording early: later
layers then simply gather on demand.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..runtime.grid import Grid
from .comm import start_depth_gather


class _Pending(NamedTuple):
    layer: int  # id of the layer the block belongs to
    flat: Tensor
    work: Any
    version: int
    dtype: torch.dtype  # the layer's gather dtype when launched (autocast may have changed since)


class Prefetcher:
    """Shared by the layers sharded in one ``auto_parallelize`` block."""

    def __init__(self) -> None:
        self.order: list[nn.Module] = []
        self.position: dict[int, int] = {}  # id(layer) -> index in order
        self.recording = True
        self.pending: _Pending | None = None
        self.hits = 0

    def __getstate__(self) -> dict:
        """Copies (``copy.deepcopy``, pickling) start afresh: no gather in flight, and the order
        recorded again at their first forward. Copying the recorded order would copy every layer
        in it along with a single copied layer, and the ids it is keyed by are the originals'."""
        return {**self.__dict__, "pending": None, "order": [], "position": {}, "recording": True, "hits": 0}

    def gathered(self, layer: nn.Module, grid: Grid) -> Tensor | None:
        """The prefetched flat block of ``layer`` (or None), and launch the next layer's."""
        if self.recording:
            if id(layer) in self.position:
                self.recording = False
            else:
                self.position[id(layer)] = len(self.order)
                self.order.append(layer)
        flat = None
        entry, self.pending = self.pending, None
        if entry is not None:
            entry.work.wait()  # also when dropped: the buffer may not be freed while in flight
            if (entry.layer == id(layer) and entry.version == layer.weight._version
                    and entry.dtype == layer.gather_dtype()):
                flat = entry.flat
                self.hits += 1
        if not self.recording:
            self._launch_after(layer, grid)
        return flat

    def _launch_after(self, layer: nn.Module, grid: Grid) -> None:
        index = self.position.get(id(layer))
        if index is None or index + 1 >= len(self.order):
            return
        following = self.order[index + 1]
        dtype = following.gather_dtype()
        flat, work = start_depth_gather(following.weight, grid, dtype, async_op=True)
        self.pending = _Pending(id(following), flat, work, following.weight._version, dtype)
