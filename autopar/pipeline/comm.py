"""Asynchronous point-to-point transfers between stages.

Shapes and dtypes of everything that crosses a boundary are known on every rank from the one
traced forward (all ranks trace the same model on the same microbatch shape), so a receive only
allocates a buffer and posts ``irecv``: no metadata messages and no host syncs per microbatch.
Every message has its own tag, derived from (kind, chunk, microbatch, tensor), so the order in
which two ranks post their halves never matters.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

Meta = tuple[torch.Size, torch.dtype]


class P2P:
    def __init__(self, group: dist.ProcessGroup, stage_ranks: Sequence[int], device: torch.device,
                 chunks: int, microbatches: int, max_tensors: int) -> None:
        self.group = group
        self.stage_ranks = list(stage_ranks)   # global rank of each pp coordinate
        self.device = device
        self.chunks, self.microbatches, self.max_tensors = chunks, microbatches, max(1, max_tensors)
        self.pending: list[dist.Work] = []
        self.bytes_sent = 0

    def _tag(self, kind: int, chunk: int, mb: int, i: int) -> int:
        return ((kind * self.chunks + chunk) * self.microbatches + mb) * self.max_tensors + i

    def send(self, tensors: Sequence[torch.Tensor], stage: int, kind: int, chunk: int, mb: int) -> None:
        """Fire and forget; ``wait_sends`` at the end of the step keeps the buffers alive."""
        for i, t in enumerate(tensors):
            t = t.detach().contiguous()
            self.pending.append(dist.isend(t, dst=self.stage_ranks[stage], group=self.group,
                                           tag=self._tag(kind, chunk, mb, i)))
            self.bytes_sent += t.numel() * t.element_size()

    def recv(self, metas: Sequence[Meta], stage: int, kind: int, chunk: int, mb: int
             ) -> tuple[list[torch.Tensor], list[dist.Work]]:
        bufs = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in metas]
        works = [dist.irecv(b, src=self.stage_ranks[stage], group=self.group, tag=self._tag(kind, chunk, mb, i))
                 for i, b in enumerate(bufs)]
        return bufs, works

    def wait_sends(self) -> None:
        for w in self.pending:
            w.wait()
        self.pending.clear()
