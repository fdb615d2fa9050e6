"""Re-gathering z blocks in backward for code autopar does not write: the fused MoE experts.

A ``Linear`` layer owns its matmul, so ``comm.depth_matmul`` saves the z piece and gathers the
(y, x) block again in backward. Fused experts run transformers' own forward (eager loops, grouped
or batched matmuls) on the gathered blocks, and those ops save the blocks, or views of them, for
backward: every MoE layer's full expert blocks then live until its backward, and experts cost
1/(x·y) at peak instead of 1/(x·y·z).

``BlockRegather`` fixes that from the outside, with saved-tensor hooks around the experts'
forward: a saved tensor that lives in a gathered block's storage is replaced by a marker (which
block, and the view's size, stride and offset), so the block is freed after forward. Backward
gathers the blocks again, and the markers become the same views of the new buffers.

Two rules make this safe on z ranks that route different tokens (each sees its own batch slice):

* **The gathers in backward do not depend on routing.** Eager experts save views only of the
  experts that got tokens, so unpacking cannot be what triggers a collective. Every block is
  gathered once, in a fixed order, by an identity on the module's output
  (``_GatherFirst``), whose backward runs before anything inside the module.
* **A block's new buffer is dropped as soon as its gradient is complete** (a hook on the
  gathered block), which is after every use of it in backward, so backward too holds one
  layer's blocks at a time.

Other saved tensors go to the hooks that were active outside (``memory_report``'s meter,
activation checkpointing), so nesting changes nothing for them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from ..runtime.grid import Grid
from .comm import start_depth_gather

class BlockRegather:
    """For one forward of one module: ``pieces`` (name -> this rank's flat z piece) and the
    ``blocks`` gathered from them. Use ``saving()`` around the forward, then pass its output
    through ``gather_first``."""

    def __init__(self, grid: Grid, pieces: Mapping[str, Tensor], blocks: Mapping[str, Tensor]) -> None:
        self.grid = grid
        self.pieces = dict(pieces)
        # During the forward the blocks are alive, so no other tensor can reuse their storage.
        self._names = {b.untyped_storage().data_ptr(): n for n, b in blocks.items()}
        self._again: dict[str, Tensor] = {}
        self.saved = 0  # tensors replaced by markers: a test's count
        for name, block in blocks.items():
            if block.requires_grad:  # the hook outlives the block tensor, which forward frees
                block.register_hook(self._dropper(name))

    def _dropper(self, name: str) -> Callable[[Tensor], None]:
        def drop(_grad: Tensor) -> None:
            self._again.pop(name, None)
        return drop

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        with torch.autograd.graph.saved_tensors_hooks(self._packer(outer), self._unpacker(outer)):
            yield

    def _packer(self, outer: tuple[Callable, Callable] | None) -> Callable[[Tensor], Any]:
        def pack(t: Tensor) -> Any:
            name = self._names.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
            if name is not None:
                self.saved += 1
                return (name, t.size(), t.stride(), t.storage_offset())
            # Detached, as the activation meter packs: a saved output kept as itself would hold
            # its own grad_fn, a cycle the GC cannot break while the graph is retained.
            return ("outer", outer[0](t)) if outer is not None else t.detach()
        return pack

    def _unpacker(self, outer: tuple[Callable, Callable] | None) -> Callable[[Any], Tensor]:
        def unpack(saved: Any) -> Tensor:
            if isinstance(saved, Tensor):
                return saved
            if saved[0] == "outer":
                return outer[1](saved[1])
            name, size, stride, offset = saved
            if name not in self._again:
                raise RuntimeError(f"the z block {name!r} of a fused experts module was needed in backward after "
                                   "its gradient was complete, or before the module's output got its gradient")
            return self._again[name].as_strided(size, stride, offset)
        return unpack

    def gather_all(self) -> None:
        """Every block again, in the module's parameter order: the same collectives on every z rank."""
        for name, piece in self.pieces.items():
            self._again[name] = start_depth_gather(piece, self.grid)[0]

    def gather_first(self, out: Tensor) -> Tensor:
        return _GatherFirst.apply(out, self)


class _GatherFirst(torch.autograd.Function):
    """Identity on a module's output whose backward gathers the module's blocks again."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, regather: BlockRegather) -> Tensor:
        ctx.regather = regather
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        ctx.regather.gather_all()
        return g, None
