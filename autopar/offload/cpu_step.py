"""``offload="optimizer+step"``: fp32 master weights, gradients and optimizer state on the host;
the step runs on the CPU.

Layout: one flat fp32 host buffer for the master weights and one for the gradients (pinned when
feeding a GPU), each parameter a view into them. The user's optimizer factory is called with the
master parameters, so the user's optimizer class and options are kept; the device parameters may
be of any dtype (bf16 halves device memory) since copies convert.

The fast path: for ``torch.optim.Adam``/``AdamW`` built with neither ``fused`` nor ``foreach``
chosen, ``fused`` is switched on: torch's fused CPU AdamW (vectorised, one pass over memory,
what DeepSpeed's CPU Adam does). An explicit ``fused=False`` or ``foreach=...`` is respected.

Timeline of one step on a GPU: gradients go device -> host on a side stream, as early as
``grads_ready`` is told they are final (the engine calls it per bucket as the bucket's
reduction ends, from the second step on) and at the latest when ``step`` starts; clipping then
scales the host copies; the host waits only
for those copies, steps, and queues the updated weights host -> device on the side stream. The
compute stream waits for that copy on the device; the host does not wait for it (until something
reads a device value, such as ``Engine.step``'s returned loss).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..runtime.grid import Grid
from .stepper import (MemoryTable, OptimizerFactory, SideCopies, device_waits, host_empty, scale_grads,
                      state_tensors, tensor_bytes)


def prefer_fused(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Select fused Adam/AdamW where the user left the implementation to torch. Safe before the
    first step: the state (and the dtype of ``step``) is created lazily from ``group["fused"]``."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return optimizer
    groups = optimizer.param_groups
    if all(g["fused"] is None and g["foreach"] is None and not g["differentiable"] for g in groups):
        for g in groups:
            g["fused"] = True
        optimizer.defaults["fused"] = True
        optimizer._step_supports_amp_scaling = True  # as torch's own __init__ does for fused
    return optimizer


def _flat_views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    views, start = [], 0
    for t in like:
        views.append(flat[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return views


class CpuStepper:
    """Host master weights + the user's optimizer stepping on the CPU."""

    def __init__(self, factory: OptimizerFactory, params: Sequence[nn.Parameter], grid: Grid) -> None:
        self.params = list(params)
        self.device = grid.device
        numel = sum(p.numel() for p in self.params)
        self._master_flat = host_empty(numel, torch.float32, self.device)
        self._grad_flat = host_empty(numel, torch.float32, self.device)
        self.masters = [nn.Parameter(v) for v in _flat_views(self._master_flat, self.params)]
        self._grads = _flat_views(self._grad_flat, self.params)
        # Plain tensors sharing the weights' storage, made once: detaching per step costs more
        # than the copies of a small model.
        self._param_data = [p.detach() for p in self.params]
        self._master_data = [m.detach() for m in self.masters]
        self._push_src, self._casts = self._staging()
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._handed_over = [False] * len(self.params)
        self._copies = SideCopies(self.device)
        self.grad_bytes = 0
        self.pull_params()
        self.optimizer = prefer_fused(factory(self.masters))
        self.optimizer.register_load_state_dict_post_hook(lambda _opt: self.pull_params())

    def _staging(self) -> tuple[list[torch.Tensor], list[tuple[list[torch.Tensor], list[torch.Tensor]]]]:
        """Sources of the weight copy to the device: the masters themselves for fp32 parameters,
        and for others a (pinned) host buffer in the parameter's dtype that the masters are
        converted into on the host. torch converts a mismatched host-to-device copy through a
        pageable temporary, which would make the copy synchronous."""
        sources = list(self._master_data)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(self.params):
            if p.dtype != torch.float32:
                by_dtype.setdefault(p.dtype, []).append(i)
        casts = []
        for dtype, indices in by_dtype.items():
            like = [self.params[i] for i in indices]
            views = _flat_views(host_empty(sum(p.numel() for p in like), dtype, self.device), like)
            for i, view in zip(indices, views):
                sources[i] = view
            casts.append((views, [self._master_data[i] for i in indices]))
        return sources, casts

    @torch.no_grad()
    def pull_params(self) -> None:
        """Refresh the master weights from the device parameters: at start, and after anything
        overwrote the device weights (a checkpoint load). Loading the optimizer's state dict does
        this automatically; a loader that writes only the model must call it. Blocks the host."""
        self._copies.synchronize()  # a weight copy to the device may still read the masters
        torch._foreach_copy_(self._master_data, self._param_data)

    @torch.no_grad()
    def grads_ready(self, params: Sequence[nn.Parameter]) -> None:
        """Start copying these parameters' gradients to the host now. They must be final:
        summed over their replicas; clipping comes later, as ``step``'s ``grad_scale``."""
        self._copy_grads([self._index[id(p)] for p in params if p.grad is not None])

    def _copy_grads(self, indices: list[int]) -> None:
        if not indices:
            return
        with self._copies:
            src = [self.params[i].grad for i in indices]
            torch._foreach_copy_([self._grads[i] for i in indices], src, non_blocking=True)
        for i in indices:
            self._handed_over[i] = True

    # The engine hands each bucket's gradients over as its reduction ends (``grads_ready``).
    takes_grads_early = True

    @torch.no_grad()
    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        """``grad_scale`` (clipping's coefficient) scales the host copies, so gradients handed
        over before the global norm was known are clipped too."""
        self._copy_grads([i for i, (p, done) in enumerate(zip(self.params, self._handed_over))
                          if p.grad is not None and not done])
        self.grad_bytes = tensor_bytes(p for p, has in zip(self.params, self._handed_over) if has)  # as on the device
        for master, grad, has in zip(self.masters, self._grads, self._handed_over):
            master.grad = grad if has else None  # no gradient this step: the optimizer skips it
        # The host waits for the gradients, and with them for the previous step's weight copy,
        # which read the masters and the staging buffers about to be overwritten.
        self._copies.synchronize()
        scale_grads(self.masters, None if grad_scale is None else grad_scale.to("cpu", torch.float32))
        self.optimizer.step()
        for staged, masters in self._casts:
            torch._foreach_copy_(staged, masters)
        with self._copies:
            torch._foreach_copy_(self._param_data, self._push_src, non_blocking=True)
            landed = self._copies.done()
        device_waits(landed, self.device)
        for p in self.params:
            p.grad = None
        self._handed_over = [False] * len(self.params)

    def synchronize(self) -> None:
        self._copies.synchronize()

    def memory(self) -> MemoryTable:
        return {"device": {"parameters": tensor_bytes(self.params), "gradients": self.grad_bytes,
                           "optimizer_state": 0},
                "host": {"parameters": self._master_flat.nbytes + sum(tensor_bytes(v) for v, _ in self._casts),
                         "gradients": self._grad_flat.nbytes,
                         "optimizer_state": tensor_bytes(state_tensors(self.optimizer))}}
