"""``offload="optimizer"``: optimizer state in host memory between steps, stepped on the device.

Why chunks: bringing the whole state back for the step would put the full state on the device
at the step's peak, which is what offloading is meant to avoid. The parameters are cut into
chunks of about ``chunk_numel`` elements; while chunk k steps on the compute stream, chunk k+1's
state is copied in on one side stream and chunk k-1's is copied out on another, so the device
holds about three chunks of state at a time and the copies hide behind the step's compute.

A chunk is stepped by calling the user's own optimizer with its ``param_groups`` narrowed to the
chunk's parameters (group options such as lr and weight decay are untouched). That is exact for
every optimizer whose update is per parameter, i.e. everything in ``torch.optim`` except LBFGS.

Which state is moved: every tensor with at least one dimension (AdamW's ``exp_avg`` and
``exp_avg_sq``). 0-d entries such as ``step`` stay where the optimizer keeps them: moving them
would cost host syncs (AdamW reads a CPU ``step`` on the host) and saves nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..runtime.grid import Grid
from .stepper import (MemoryTable, OptimizerFactory, SideCopies, device_waits, host_empty, scale_grads,
                      state_tensors, tensor_bytes)

DEFAULT_CHUNK_NUMEL = 1 << 24
"""16 Mi parameters: 128 MiB of fp32 AdamW state per chunk, large enough for full-bandwidth copies."""

Slot = tuple[nn.Parameter, str]


@dataclass
class _Chunk:
    """Parameters stepped together, per param group, and the host home of their state."""

    groups: list[list[nn.Parameter]]
    slots: list[Slot] = field(default_factory=list)
    host: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # one flat buffer per dtype
    views: list[torch.Tensor] = field(default_factory=list)             # per slot, into ``host``


def _split(optimizer: torch.optim.Optimizer, chunk_numel: int) -> list[_Chunk]:
    """Consecutive parameters, each group's order kept, cut once a chunk reaches ``chunk_numel``."""
    n_groups = len(optimizer.param_groups)
    chunks, current, size = [], [[] for _ in range(n_groups)], 0
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if size and size + p.numel() > chunk_numel:
                chunks.append(_Chunk(current))
                current, size = [[] for _ in range(n_groups)], 0
            current[gi].append(p)
            size += p.numel()
    if size:
        chunks.append(_Chunk(current))
    return chunks


class StateOffloadStepper:
    """The user's optimizer on the device parameters; its big state tensors live in (pinned)
    host buffers except while their chunk steps."""

    def __init__(self, factory: OptimizerFactory, params: Sequence[nn.Parameter], grid: Grid,
                 chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> None:
        self.params = list(params)
        self.optimizer = factory(self.params)
        self.device = grid.device
        self.grad_bytes = 0
        self._chunks = _split(self.optimizer, chunk_numel)
        self._h2d, self._d2h = SideCopies(self.device), SideCopies(self.device)
        # Readers of the state (checkpointing) must see finished copies; a loaded state arrives
        # on the device (torch casts it to the parameters' device) and must go back home.
        self.optimizer.register_state_dict_pre_hook(lambda _opt: self.synchronize())
        self.optimizer.register_load_state_dict_post_hook(lambda _opt: self._send_all_home())

    takes_grads_early = False  # the gradients stay on the device; the state comes to them

    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        scale_grads(self.params, grad_scale)
        opt = self.optimizer
        self.grad_bytes = tensor_bytes(p.grad for p in self.params if p.grad is not None)
        full = [group["params"] for group in opt.param_groups]
        try:
            ready = self._fetch(self._chunks[0]) if self._chunks else None
            for k, chunk in enumerate(self._chunks):
                ready_next = self._fetch(self._chunks[k + 1]) if k + 1 < len(self._chunks) else None
                device_waits(ready, self.device)
                for group, subset in zip(opt.param_groups, chunk.groups):
                    group["params"] = subset
                opt.step()
                self._send_home(chunk)
                ready = ready_next
        finally:
            for group, params in zip(opt.param_groups, full):
                group["params"] = params
        opt.zero_grad(set_to_none=True)

    def grads_ready(self, params: Sequence[nn.Parameter]) -> None:
        """Nothing to start early: the state moves in ``step``, chunk by chunk."""

    def synchronize(self) -> None:
        """Wait until the state copied out by the last step has landed in host memory."""
        self._d2h.synchronize()

    def pull_params(self) -> None:
        """Only the state lives on the host; the optimizer steps the device parameters."""

    def _fetch(self, chunk: _Chunk) -> torch.cuda.Event | None:
        """Start copying ``chunk``'s state to fresh device buffers and point the optimizer at
        them; returns the event the step must wait for."""
        if not chunk.slots:  # first step: the optimizer creates the state itself
            return None
        self._h2d.after(self._d2h)  # the host buffers hold the last copy-out
        with self._h2d:
            on_device = {dtype: torch.empty_like(buf, device=self.device) for dtype, buf in chunk.host.items()}
            for dtype, buf in chunk.host.items():
                on_device[dtype].copy_(buf, non_blocking=True)
            offsets = dict.fromkeys(on_device, 0)
            for (p, key), view in zip(chunk.slots, chunk.views):
                start = offsets[view.dtype]
                self.optimizer.state[p][key] = on_device[view.dtype][start:start + view.numel()].view_as(view)
                offsets[view.dtype] = start + view.numel()
            return self._h2d.done()

    def _send_home(self, chunk: _Chunk) -> None:
        """Copy ``chunk``'s state out after its step and point the optimizer at the host copies."""
        state = self.optimizer.state
        slots = [(p, key) for params in chunk.groups for p in params
                 for key, t in state.get(p, {}).items() if isinstance(t, torch.Tensor) and t.dim() > 0]
        if [(id(p), k) for p, k in slots] != [(id(p), k) for p, k in chunk.slots]:
            self._lay_out(chunk, slots)
        if not slots:  # no parameter of this chunk has had a gradient yet
            return
        sources = [state[p][key] for p, key in slots]
        with self._d2h:
            torch._foreach_copy_(chunk.views, sources, non_blocking=True)
            self._d2h.keep_alive(sources)
        for (p, key), view in zip(slots, chunk.views):
            state[p][key] = view

    def _lay_out(self, chunk: _Chunk, slots: list[Slot]) -> None:
        """(Re)allocate the chunk's host buffers: on the first step, or when the set of state
        entries changed (a parameter got its first gradient late, a state dict was loaded)."""
        self._d2h.synchronize()
        sizes: dict[torch.dtype, int] = {}
        placed = []
        for p, key in slots:
            t = self.optimizer.state[p][key]
            placed.append((t.dtype, sizes.get(t.dtype, 0), t.shape))
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        chunk.host = {dtype: host_empty(n, dtype, self.device) for dtype, n in sizes.items()}
        chunk.views = [chunk.host[dtype][start:start + shape.numel()].view(shape) for dtype, start, shape in placed]
        chunk.slots = slots

    def _send_all_home(self) -> None:
        for chunk in self._chunks:
            self._send_home(chunk)
        self.synchronize()

    def memory(self) -> MemoryTable:
        host = sum(tensor_bytes(c.host.values()) for c in self._chunks)
        return {"device": {"parameters": tensor_bytes(self.params), "gradients": self.grad_bytes,
                           "optimizer_state": tensor_bytes(state_tensors(self.optimizer)) - host},
                "host": {"parameters": 0, "gradients": 0, "optimizer_state": host}}
