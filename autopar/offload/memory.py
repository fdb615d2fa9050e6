"""``autopar.memory_report``: bytes per rank of parameters, gradients, optimizer state and peak
activations, on the compute device and in host (offload) memory.

Activations are measured, not modelled: while an ``ActivationMeter`` is enabled, a saved-tensor
hook sees every tensor autograd keeps for backward and counts its storage once (views and
repeated saves share it) until autograd lets go of it; the peak of that running sum over the
step is the activation figure. Parameters saved for backward are excluded (they are counted as
parameters). Inside recompute regions autograd saves nothing, so recompute shows up as a lower
peak; the regions' inputs, kept alive by the recompute closure rather than by autograd, are not
counted. The engine enables the meter for its first step only, since a Python call per saved
tensor is not free; set ``engine.activation_meter.enabled = True`` to measure another step.
On CUDA the report also carries ``torch.cuda.max_memory_allocated``, the allocator's own peak.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations")


class _Saved:
    """What autograd stores instead of a saved tensor; its death releases the count. It holds
    its meter weakly: autograd keeps it in C++, where Python's GC cannot see, and a strong
    reference would tie the meter's model (and through the model the grid's process groups) to
    the life of whatever graph saved it."""

    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: "weakref.ref[ActivationMeter]", key: int, tensor: torch.Tensor) -> None:
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self) -> None:
        meter = self.meter()
        if meter is not None:
            meter._release(self.key)


def _pack_into(meter_ref: "weakref.ref[ActivationMeter]", tensor: torch.Tensor) -> Any:
    meter = meter_ref()
    return tensor.detach() if meter is None else meter._pack(tensor)


class ActivationMeter:
    """Peak bytes of tensors saved for backward inside ``with meter:`` while ``enabled``.

    The engine wraps forward and backward of a step in it, so every schedule (gradient
    accumulation, pipeline stages) is measured the same way."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.enabled = True
        self.peak = 0
        self._current = 0
        self._live: dict[int, list[int]] = {}  # storage address -> [saves alive, bytes]
        self._params: set[int] = set()
        self._hooks: Any = None
        self._weak = weakref.ref(self)  # what the hooks and the saved records hold (see _Saved)

    def __enter__(self) -> "ActivationMeter":
        if self.enabled:
            self._params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
            # The hooks reach the meter through a weak reference, for the reason _Saved does:
            # autograd holds them in C++ for as long as any graph saved under them lives. A
            # zero-bubble stage's input-gradient pass (retain_graph=True) left such a graph alive
            # after destroy(), and the bound method kept the model and its groups with it.
            self._hooks = torch.autograd.graph.saved_tensors_hooks(partial(_pack_into, self._weak), self._unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None

    def _pack(self, tensor: torch.Tensor) -> Any:
        # Whatever is kept is detached: an op that saves its own output (softmax, attention)
        # would otherwise hold a tensor whose grad_fn holds the saved value, a cycle through C++
        # that Python's GC cannot see, so a graph that never runs backward (the pipeline's traced
        # loss) or that keeps its buffers (zero bubble's input-gradient pass, retain_graph=True)
        # leaked with every tensor it saved, and the grid's groups through the Functions' ctx.
        # That includes the unmetered tensors: ``_params`` holds addresses, and once a parameter
        # moves (into a gradient bucket's flat buffer) an activation can take its old address.
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._params:
            return tensor.detach()
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [1, storage.nbytes()]
            self._current += storage.nbytes()
            self.peak = max(self.peak, self._current)
        else:
            entry[0] += 1
        return _Saved(self._weak, key, tensor.detach())

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self._current -= entry[1]
            del self._live[key]


@dataclass(frozen=True)
class MemoryReport:
    """One rank's memory, in bytes. ``on_device`` is the compute device (``device``, which is the
    host itself on a CPU-only run); ``on_host`` is what offload keeps in host memory."""

    rank: int
    device: str
    offload: str | None
    on_device: dict[str, int]
    on_host: dict[str, int]
    peak_allocated: int | None  # torch.cuda.max_memory_allocated; None off CUDA

    def total(self, where: str = "device") -> int:
        return sum((self.on_device if where == "device" else self.on_host).values())


def format_reports(reports: list[MemoryReport]) -> str:
    """A text table, one row per rank and place, in MiB."""
    head = f"{'rank':>4} {'offload':>14} {'where':>10} " + " ".join(f"{c:>15}" for c in CATEGORIES) + f" {'total':>9}"
    rows = [head]
    for r in reports:
        for where, table in ((r.device, r.on_device), ("host", r.on_host)):
            cells = " ".join(f"{table[c] / 2**20:15.2f}" for c in CATEGORIES)
            rows.append(f"{r.rank:>4} {str(r.offload):>14} {where:>10} {cells} {sum(table.values()) / 2**20:9.2f}")
    return "\n".join(rows)


def memory_report(engine: Any, all_ranks: bool = False) -> MemoryReport | list[MemoryReport]:
    """This rank's memory report for an ``autopar`` engine, best taken after the first step.
    ``all_ranks=True`` gathers every rank's report (a collective: call it on every rank)."""
    grid = engine.grid
    table = engine.stepper.memory()
    if engine.zero:  # the stepper only sees the flat shards; the rank still holds every full
        # parameter (the shards are views into it) and every gradient bucket
        table["device"]["parameters"] = sum(p.numel() * p.element_size() for p in engine.params)
        table["device"]["gradients"] = engine.dp.held_grad_bytes()
    peak = torch.cuda.max_memory_allocated(grid.device) if grid.device.type == "cuda" else None
    report = MemoryReport(rank=grid.rank, device=str(grid.device), offload=engine.offload,
                          on_device={**table["device"], "activations": engine.activation_meter.peak},
                          on_host={**table["host"], "activations": 0}, peak_allocated=peak)
    if not all_ranks:
        return report
    gathered: list[Any] = [None] * grid.world_size
    dist.all_gather_object(gathered, report)
    return gathered
