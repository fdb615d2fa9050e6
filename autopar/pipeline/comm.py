"""Point-to-point transfers between stages, posted as the grouped launches of ``program``.

Every ``Post`` of a rank's program becomes one ``batch_isend_irecv``: the sends of what this
rank produced since the last exchange point and the receives of what its neighbours produced,
in the order both ends derive from the schedules, so NCCL (which ignores tags and serialises
p2p per rank pair) matches every pair. Tags are still set, for backends that do use them.

Receive buffers are allocated from the shapes traced for the current microbatch signature, so
there are no metadata messages and no host syncs per microbatch. A sent tensor is dropped as
soon as its operation completes (polled, never waited for, at every step of the program), so a
stage holds what its schedule keeps in flight, not every message of the step.

``AUTOPAR_VERBOSE_P2P=1`` logs every posted send and receive (rank, peer, message, bytes).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .program import ACT, Message, Post

log = logging.getLogger("autopar")
Meta = tuple[torch.Size, torch.dtype]
VERBOSE = os.environ.get("AUTOPAR_VERBOSE_P2P", "") not in ("", "0")


class P2P:
    def __init__(self, group: dist.ProcessGroup, stage_ranks: Sequence[int], device: torch.device,
                 chunks: int, microbatches: int) -> None:
        self.group = group
        self.stage_ranks = list(stage_ranks)   # global rank of each pp coordinate
        self.pp = len(self.stage_ranks)
        self.rank = dist.get_rank()
        self.device = device
        self.chunks, self.microbatches = chunks, microbatches
        self.in_flight: list[tuple[dist.Work, torch.Tensor]] = []
        self.bytes_sent = 0
        self.peak_in_flight = 0  # most sent tensors held at once (bench/, tests)
        # Set to [] to record every posted launch as (point, sends, recvs) (tests).
        self.posted: list[tuple[int, tuple[Message, ...], tuple[Message, ...]]] | None = None

    def _tag(self, msg: Message, i: int, width: int) -> int:
        return ((msg.kind * (self.chunks + 1) + msg.chunk) * self.microbatches + msg.mb) * width + i

    def post(self, step: Post, outbox: dict[Message, list[torch.Tensor]],
             metas: Callable[[Message], list[Meta]]
             ) -> dict[Message, tuple[list[torch.Tensor], list[dist.Work]]]:
        """Launch ``step``; returns the receive buffers and their works, by message."""
        ops: list[dist.P2POp] = []
        width = 64  # tensors per message the tags can tell apart
        for msg in step.sends:
            peer = self.stage_ranks[msg.dst(self.pp)]
            for i, t in enumerate(outbox.pop(msg)):
                ops.append(dist.P2POp(dist.isend, t, peer, self.group, self._tag(msg, i, width)))
                self.bytes_sent += t.numel() * t.element_size()
        received: dict[Message, tuple[list[torch.Tensor], list[int]]] = {}
        for msg in step.recvs:
            peer = self.stage_ranks[msg.src(self.pp)]
            bufs = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in metas(msg)]
            received[msg] = (bufs, list(range(len(ops), len(ops) + len(bufs))))
            ops += [dist.P2POp(dist.irecv, b, peer, self.group, self._tag(msg, i, width)) for i, b in enumerate(bufs)]
        if VERBOSE:
            log.info("p2p rank %d point %d: send %s recv %s (%d bytes out)", self.rank, step.point,
                     [_name(m) for m in step.sends], [_name(m) for m in step.recvs],
                     sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend))
        if self.posted is not None:
            self.posted.append((step.point, step.sends, step.recvs))
        works = dist.batch_isend_irecv(ops) if ops else []
        for op, work in zip(ops, works):
            if op.op is dist.isend:
                self.in_flight.append((work, op.tensor))
        self.peak_in_flight = max(self.peak_in_flight, len(self.in_flight))
        return {msg: (bufs, [works[i] for i in idx]) for msg, (bufs, idx) in received.items()}

    def release(self) -> None:
        """Drop the sent tensors whose transfer has completed (no waiting)."""
        self.in_flight = [(w, t) for w, t in self.in_flight if not w.is_completed()]

    def wait_sends(self) -> None:
        for w, _ in self.in_flight:
            w.wait()
        self.in_flight.clear()


def _name(msg: Message) -> str:
    return f"{'A' if msg.kind == ACT else 'G'}{msg.chunk}.{msg.mb}"

