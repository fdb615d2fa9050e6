"""The optimizer step as the engine sees it: one object per offload mode, built by ``build_stepper``.

The engine only ever calls ``step(grad_scale)`` (which also clears the gradients) after backward
and gradient sync; ``grad_scale`` is clipping's coefficient, applied by the stepper wherever it
keeps the gradients. Each mode owns where gradients, master weights and optimizer state live, and
reports their bytes for ``memory_report``. ``stepper.optimizer`` is always the user's own
``torch.optim.Optimizer``, so LR schedulers and ``state_dict()`` keep working unchanged.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..runtime.grid import Grid

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
MemoryTable = dict[str, dict[str, int]]  # {"device" | "host": {"parameters" | "gradients" | "optimizer_state": bytes}}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def scale_grads(params: Sequence[nn.Parameter], scale: torch.Tensor | None) -> None:
    """Multiply the gradients present by ``scale`` (clipping's coefficient) in place."""
    if scale is not None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)


def host_empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host buffer; page-locked when it feeds an accelerator, so copies run asynchronously
    (a pageable buffer makes every ``non_blocking`` copy a synchronous one)."""
    return torch.empty(numel, dtype=dtype, pin_memory=device.type == "cuda")


class DeviceStepper:
    """``offload=None``: the user's optimizer on the device parameters, nothing moves."""

    def __init__(self, factory: OptimizerFactory, params: Sequence[nn.Parameter], grid: Grid) -> None:
        self.params = list(params)
        self.optimizer = factory(self.params)
        self.grad_bytes = 0

    # Gradients stay on the device until the step: nothing to gain from knowing them early.
    takes_grads_early = False

    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        scale_grads(self.params, grad_scale)
        self.grad_bytes = tensor_bytes(p.grad for p in self.params if p.grad is not None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grads_ready(self, params: Sequence[nn.Parameter]) -> None:
        """Hook for the gradient sync (called per bucket as its reduction ends); only
        ``offload="optimizer+step"`` has something to start early: the copy to the host."""

    def synchronize(self) -> None:
        """Nothing is ever in flight here."""

    def pull_params(self) -> None:
        """The optimizer steps the device parameters themselves: no copy to refresh."""

    def memory(self) -> MemoryTable:
        return {"device": {"parameters": tensor_bytes(self.params), "gradients": self.grad_bytes,
                           "optimizer_state": tensor_bytes(state_tensors(self.optimizer))},
                "host": {"parameters": 0, "gradients": 0, "optimizer_state": 0}}


class SideCopies:
    """Host<->device copies on a side stream, ordered after the compute stream's queued work.

    On CUDA the copies overlap with compute; ``done()`` returns an event the consumer waits on.
    On CPU there is no stream: the copies run inline and every event is None, so the same code
    is exercised (host to host) by the CPU tests.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __enter__(self) -> "SideCopies":
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            self._ctx.__exit__(*exc)

    def after(self, other: "SideCopies") -> None:
        """Order this stream's next copies after everything queued on ``other``."""
        if self.stream is not None:
            self.stream.wait_stream(other.stream)

    def keep_alive(self, tensors: Sequence[torch.Tensor]) -> None:
        """Device memory read by queued copies must not be reused before they run, even if the
        caller drops its last reference now (the caching allocator only tracks the allocating
        stream)."""
        if self.stream is not None:
            for t in tensors:
                if t.device.type == "cuda":
                    t.record_stream(self.stream)

    def done(self) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def device_waits(event: torch.cuda.Event | None, device: torch.device) -> None:
    """Make the compute stream wait for ``event`` without blocking the host."""
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)
