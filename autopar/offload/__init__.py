"""Offload and memory: where optimizer state and master weights live, activation recompute, and
the memory report. Depends only on ``runtime``; the engine composes it with the parallel axes."""
from __future__ import annotations

from typing import Sequence, Union

from torch import nn

from ..runtime.grid import Grid
from .cpu_step import CpuStepper
from .memory import ActivationMeter, MemoryReport, format_reports, memory_report
from .recompute import RecomputePolicy, apply_recompute
from .state_offload import StateOffloadStepper
from .stepper import DeviceStepper, OptimizerFactory

Stepper = Union[DeviceStepper, StateOffloadStepper, CpuStepper]
STEPPERS: dict[str | None, type] = {None: DeviceStepper, "optimizer": StateOffloadStepper,
                                    "optimizer+step": CpuStepper}


def build_stepper(factory: OptimizerFactory, params: Sequence[nn.Parameter], offload: str | None,
                  grid: Grid) -> Stepper:
    """The engine's optimizer step for ``offload``; ``.optimizer`` is the user's optimizer."""
    if offload not in STEPPERS:
        raise ValueError(f"unknown offload {offload!r}; choose one of {tuple(STEPPERS)}")
    return STEPPERS[offload](factory, params, grid)


__all__ = ["ActivationMeter", "CpuStepper", "DeviceStepper", "MemoryReport", "RecomputePolicy",
           "StateOffloadStepper", "Stepper", "apply_recompute", "build_stepper", "format_reports",
           "memory_report"]
