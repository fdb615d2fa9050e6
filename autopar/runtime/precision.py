"""Mixed precision for ``Engine``: autocast forward, fp32 master weights, fp16 loss scaling.

Why the weights stay fp32: they *are* the master weights. Autocast casts them to bf16/fp16 per
op in forward; autograd casts each weight gradient back to the weight's dtype, so gradients,
their data-parallel reduction, clipping and the optimizer step all stay fp32, unchanged.

Why the engine's callables are wrapped instead of the model: the pipeline (pp > 1) receives
``call`` and ``loss`` from the engine and runs its first, traced forward through them, so the
activation shapes and dtypes it sends between stages are the ones autocast produces. Backward
runs outside autocast, as torch requires (autocast backward ops follow the forward's dtypes).

fp16 needs a loss scale (its exponent range loses small gradients). The scale enters through
an identity whose backward multiplies by the *current* scale tensor: the loss value reported
by ``Engine.step`` stays unscaled, the pipeline's fixed ``loss_scale`` float needs no change,
and the dynamic scale never has to be read on the host to scale a loss.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .grid import AXES, Grid

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: object) -> None:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {tuple(PRECISIONS)} "
                         "(weights, gradients and optimizer state stay fp32 in every mode)")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies by ``scale`` (read when backward runs)."""

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.scale = scale
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class LossScaler:
    """Dynamic loss scaling with torch's amp kernels, skipping an overflowing step on every rank.

    Why the whole world votes: pipeline stages, tensor-parallel shards and ZeRO shards hold
    different gradients, so an inf may show up on one rank only; if that rank alone skipped,
    the replicas would diverge. ``found_inf`` is therefore all-reduced (MAX) over every axis.
    Defaults are torch's ``GradScaler``'s.
    """

    def __init__(self, grid: Grid, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> None:
        self.grid = grid
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=grid.device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=grid.device)
        self.skipped_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        # fp32 first: a scaled fp16 gradient seed of 2**16 would already be inf.
        return _ScaleGrad.apply(loss.float(), self.scale)

    @torch.no_grad()
    def unscale_and_update(self, params: Iterable[nn.Parameter]) -> bool:
        """Divide the (reduced) gradients by the scale, agree world-wide on whether any is inf/NaN,
        update the scale; returns True when this step must be skipped. One host sync, as in
        ``GradScaler``: the skip decision is a Python branch."""
        found_inf = torch.zeros((), dtype=torch.float32, device=self.grid.device)
        inv_scale = self.scale.double().reciprocal().float()
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in groups.values():  # the kernel takes one device and dtype per call
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        if self.grid.world_size > 1:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.grid.group(*AXES))
        torch._amp_update_scale_(self.scale, self._growth_tracker, found_inf, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)
        skip = bool(found_inf.item())
        self.skipped_steps += skip
        return skip

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale.item(), "growth_tracker": int(self._growth_tracker.item()),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale.fill_(state["scale"])
        self._growth_tracker.fill_(state["growth_tracker"])
        self.skipped_steps = state["skipped_steps"]


class Precision:
    """The engine's view: wrap ``call(model, batch)`` and ``loss(output, batch)``, and own the
    ``LossScaler`` (fp16 only; ``scaler`` is None otherwise)."""

    def __init__(self, precision: str, grid: Grid) -> None:
        check_precision(precision)
        self.name, self.dtype, self.device_type = precision, PRECISIONS[precision], grid.device.type
        self.scaler = LossScaler(grid) if precision == "fp16" else None

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def wrap_call(self, call: Callable[[nn.Module, Any], Any]) -> Callable[[nn.Module, Any], Any]:
        if self.dtype is None:
            return call

        def autocast_call(model: nn.Module, batch: Any) -> Any:
            with self.autocast():
                return call(model, batch)
        return autocast_call

    def wrap_loss(self, loss: Callable[[Any, Any], torch.Tensor]) -> Callable[[Any, Any], torch.Tensor]:
        if self.dtype is None:
            return loss
        scaler = self.scaler

        def autocast_loss(output: Any, batch: Any) -> torch.Tensor:
            with self.autocast():
                value = loss(output, batch)
            return scaler.scale_loss(value) if scaler is not None else value.float()
        return autocast_loss


def drop_grads(params: Iterable[nn.Parameter]) -> None:
    """A skipped step clears gradients exactly as a stepper's ``step()`` would (``set_to_none``),
    so ``GradBuckets.after_step`` re-attaches its zeroed buffers as after any step."""
    for p in params:
        p.grad = None
