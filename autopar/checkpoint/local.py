"""What this rank holds, named by the serial model: model tensors and optimizer state segments.

Names: a checkpoint key is the serial model's name of a tensor. Tied parameters (GPT-2's
``wte``/``lm_head``) are stored once, under the first name ``named_parameters`` gives in the
serial model. A pipeline stage may only hold the tied copy under its other name, and after the
split that tie is no longer visible, so ``remember_aliases`` records the serial ties when the
engine is built (``model._autopar_aliases``: other name -> stored name).

Optimizer state: the optimizer may step the model parameters themselves, host master copies of
them (``offload="optimizer+step"``: ``stepper.masters[i]`` mirrors ``stepper.params[i]``) or flat
ZeRO shards of gradient buckets (``engine.dp.buckets``: ``params``, ``offsets``, ``rank``,
``shard_numel``, ``shard_param``). Each optimizer parameter is described as segments: runs of its
flattened elements that are a region of one named serial parameter. State tensors shaped like
their parameter follow the same segments, so state reshards exactly like the weights.

Who writes: a tensor replicated over some grid axes is written by the copy at coordinate 0 of
each of them; the axes it is *partitioned* over are its ``shard_axes`` tag (``runtime.params``).
A second copy of a tied weight on a later pipeline stage is tagged ``norm_duplicate`` and
skipped, its twin on the first stage is saved.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..runtime.grid import AXES
from ..runtime.params import is_norm_duplicate, shard_axes
from .regions import Region, full_shape, region_of


def model_of(engine_or_model: Any) -> nn.Module:
    model = getattr(engine_or_model, "model", engine_or_model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an autopar Engine or an nn.Module, got {type(engine_or_model).__name__}")
    return model


def remember_aliases(model: nn.Module) -> None:
    """Record the serial model's tied parameter names; call before any pipeline split."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
        if first[id(p)] != name:
            aliases[name] = first[id(p)]
    model._autopar_aliases = aliases


def aliases_of(model: nn.Module) -> dict[str, str]:
    if not hasattr(model, "_autopar_aliases"):
        remember_aliases(model)
    return model._autopar_aliases


def serial_names(model: nn.Module) -> list[str]:
    """Stored names of every parameter and persistent buffer, on every pipeline stage, in the
    serial model's order."""
    aliases = aliases_of(model)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in _buffers(model, present_only=False)]
    return list(dict.fromkeys(aliases.get(n, n) for n in names))


def _buffers(model: nn.Module, present_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    for prefix, module in model.named_modules():
        if present_only and getattr(module, "_autopar_absent", False):
            continue
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), b


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters and persistent buffers under their stored names; modules living on
    another pipeline stage (``_autopar_absent``) are left out."""
    aliases = aliases_of(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        if getattr(module, "_autopar_absent", False):
            continue
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen and not getattr(p, "_autopar_absent", False):
                seen.add(id(p))
                full = f"{prefix}.{name}" if prefix else name
                out[aliases.get(full, full)] = p
    for name, b in _buffers(model, present_only=True):
        out.setdefault(name, b)
    return out


def writes(owner: torch.Tensor, coords: Mapping[str, int], replicated_over_pp: bool) -> bool:
    """Whether this rank's copy of ``owner`` is the one that gets written."""
    if is_norm_duplicate(owner):
        return False
    parts = set(shard_axes(owner))
    return all(coords[a] == 0 for a in AXES if a not in parts and (a != "pp" or replicated_over_pp))


def local_region(tensor: torch.Tensor, coords: Mapping[str, int]) -> Region:
    if shard_axes(tensor) and not hasattr(tensor, "_autopar_spec"):
        raise ValueError(f"a tensor of shape {tuple(tensor.shape)} is sharded over {shard_axes(tensor)} "
                         "but carries no _autopar_spec, so its place in the full tensor is unknown")
    return region_of(tensor, coords)


@dataclass(frozen=True)
class Segment:
    """Elements ``start : start + region.numel`` of a flattened optimizer parameter are
    ``region`` of the serial parameter ``name`` (of shape ``shape``)."""

    name: str
    shape: tuple[int, ...]
    region: Region
    start: int


@dataclass(frozen=True)
class OptimizerParam:
    param: torch.Tensor        # what the optimizer steps (its state is keyed by it)
    owner: torch.Tensor        # the tensor whose tags say who writes it
    segments: tuple[Segment, ...]


def optimizer_params(engine: Any, coords: Mapping[str, int]) -> list[OptimizerParam]:
    """Every parameter of ``engine.optimizer``, in ``state_dict`` order, with its segments."""
    optimizer = engine.optimizer
    stepper = getattr(engine, "stepper", None)
    masters = getattr(stepper, "masters", None)
    mirror = {id(m): p for m, p in zip(masters, stepper.params)} if masters is not None else {}
    dp = getattr(engine, "dp", None)
    buckets = {id(b.shard_param): b for b in dp.buckets} if getattr(dp, "zero", 0) else {}
    names = {id(t): n for n, t in model_tensors(engine.model).items()}
    out = []
    for group in optimizer.param_groups:
        for q in group["params"]:
            owner = mirror.get(id(q), q)
            bucket = buckets.get(id(owner))
            if bucket is None:
                segs = (Segment(names[id(owner)], full_shape(owner), local_region(owner, coords), 0),)
            else:
                segs = tuple(_zero_segments(bucket, names, coords))
            out.append(OptimizerParam(q, owner, segs))
    return out


def _zero_segments(bucket: Any, names: Mapping[int, str], coords: Mapping[str, int]) -> Iterator[Segment]:
    """A ZeRO shard is the bucket's flat elements ``rank*S : (rank+1)*S``; cut it at the
    boundaries of the parameters packed into the bucket."""
    lo = bucket.rank * bucket.shard_numel
    hi = lo + bucket.shard_numel
    for p, off in zip(bucket.params, bucket.offsets):
        a, b = max(lo, off), min(hi, off + p.numel())
        if a < b:
            region = local_region(p, coords).sub(a - off, b - off)
            if region.numel:
                yield Segment(names[id(p)], full_shape(p), region, a - lo)
