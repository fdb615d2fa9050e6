"""``with autopar.auto_parallelize():`` turns layers built inside it into 3D-parallel layers.

How layers are caught: ``nn.Linear``, ``nn.Embedding`` and HF ``Conv1D`` get a ``__new__`` that,
inside the block, allocates the parallel subclass instead. Patching the class itself (not the
names it is imported under) catches ``from torch.nn import Linear`` bound before the block,
``torch.nn.modules.linear.Linear`` and any alias; ``isinstance(layer, nn.Linear)`` stays true.
Subclasses that only add elementwise work around the base forward (Gemma's and BART's scaled
embeddings) get a parallel twin (``subclass``), so a tie between such an embedding and its LM
head survives; other subclasses (``nn.MultiheadAttention``'s out_proj, used through its raw
weight; routers that read ``self.weight``) stay serial and are logged with the reason.

Why layers are sharded at the *end* of the block and not at construction: Hugging Face models
re-initialise and tie weights after building layers (``post_init``, ``_init_weights``,
``tie_weights``, ``from_pretrained`` loading). Letting all of that run on full, serial tensors
makes the result bit-identical to a serial build with no knowledge of HF internals; the cost is
the full model being resident until the block exits. For models too big for that, build under
``torch.device("meta")`` and call ``materialize(model)`` afterwards: each layer then draws its
full weight one layer at a time with its default init and keeps its slice.

Layers whose dimensions do not divide the grid, that are smaller than ``min_numel`` or use
options the parallel layer does not reproduce (``max_norm``, ``sparse``...) stay replicated;
the list is logged once, or raised with ``strict=True``.

Biases are sharded with the output features (over y). A bias that some module other than
parallel layers also holds (BERT ties the decoder's bias to ``cls.predictions.bias``) must stay
one tensor, so it stays whole: the block records every parameter registration made inside it
(``torch.nn.modules.module.register_module_parameter_registration_hook``) to find such ties,
since they are plain attribute assignments that the layers never see. A weight tied that way
keeps its whole layer (and every layer sharing it) serial, named in the log with the holder.
Fused MoE expert tensors (transformers 5's ``@use_experts_implementation`` classes) are
sharded by ``experts`` (whole experts over x·y, each block over z), or named in the log with
the reason they stay whole. Other parameters registered in the block that no parallel layer
holds and that are a large share of what the block built (custom modules; ``LARGE_SHARE``) are
named in the same log, since they keep the memory per rank from following the grid.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Mapping

import torch
from torch import nn

from ..runtime.params import set_grad_axes
from ..runtime.state import current_grid
from .autochain import watch
from .experts import plan_experts
from .layers import Embedding, Linear, ShardedModule, conv1d_class, make_local, spec_of
from .layout import ShardSpec, bias_spec, divisible, linear_weight_spec
from .prefetch import Prefetcher
from .subclass import serial_base, twin

log = logging.getLogger("autopar")

LARGE_SHARE = 0.05  # unsharded parameters above this share of a block's elements are logged
_NO_TIES: Mapping[int, str] = MappingProxyType({})


@dataclass
class _Block:
    built: list[ShardedModule] = field(default_factory=list)
    serial: list[tuple[nn.Module, str]] = field(default_factory=list)  # subclasses kept serial, why


_recording = threading.local()  # .stack: one _Block per open block, innermost last
_swaps: dict[type, type] = {}


def _new(cls: type, *args: object, **kwargs: object) -> object:
    stack = getattr(_recording, "stack", None)
    if not stack:
        return object.__new__(cls)
    parallel: type | str | None = cls if issubclass(cls, ShardedModule) else _swaps.get(cls)
    if parallel is None:
        base = serial_base(cls, _swaps)
        parallel = twin(cls, base, _swaps[base]) if base is not None else None
    if isinstance(parallel, str):
        module = object.__new__(cls)
        stack[-1].serial.append((module, parallel))
        return module
    if parallel is None:
        return object.__new__(cls)
    layer = object.__new__(parallel)
    stack[-1].built.append(layer)
    return layer


def _install() -> None:
    """Give each serial class the recording ``__new__`` (once; outside a block it is
    ``object.__new__``). It is never removed: deleting ``__new__`` from a class leaves CPython
    checking constructor arguments against ``object.__new__``."""
    if not _swaps:
        _swaps.update({nn.Linear: Linear, nn.Embedding: Embedding})
        if importlib.util.find_spec("transformers") is not None:
            from transformers.pytorch_utils import Conv1D

            _swaps[Conv1D] = conv1d_class()
    for serial in _swaps:
        if serial.__dict__.get("__new__") is not _new_static:
            serial.__new__ = _new_static


_new_static = staticmethod(_new)


def plan(layer: ShardedModule, sizes: dict[str, int], min_numel: int,
         foreign: Mapping[int, str] = _NO_TIES) -> tuple[dict[str, ShardSpec], str]:
    """Layouts for ``layer``'s parameters, or ({}, why it stays replicated). ``foreign``: ids of
    parameters that modules other than parallel layers hold too (kept whole) -> those modules."""
    w = layer._parameters.get("weight")
    if w is None or w.dim() != 2:
        return {}, "no 2D weight"
    if id(w) in foreign:
        return {}, f"its weight is tied to {foreign[id(w)]}, which is not a parallel layer (kept whole, " \
                   "so the tie survives)"
    if w.numel() < min_numel:
        return {}, f"smaller than min_numel={min_numel}"
    if isinstance(layer, Embedding) and (layer.max_norm is not None or layer.sparse or layer.scale_grad_by_freq):
        return {}, "uses max_norm / sparse / scale_grad_by_freq"
    transposed = not isinstance(layer, (Linear, Embedding))
    spec = linear_weight_spec(tuple(w.shape), sizes, transposed)
    if not divisible(spec.full_shape, spec.dim_axes, sizes):
        return {}, f"weight {tuple(w.shape)} does not divide over {spec.dim_axes} = " \
                   f"({sizes[spec.dim_axes[0]]}, {sizes[spec.dim_axes[1]]})"
    specs = {"weight": spec}
    b = layer._parameters.get("bias")
    if b is not None and sizes["y"] > 1 and id(b) not in foreign:
        specs["bias"] = bias_spec(b.shape[0], sizes)  # out divides over y: the weight's rows do
    return specs, ""


def shard_layers(layers: list[ShardedModule], strict: bool = False, min_numel: int = 0,
                 foreign: Mapping[int, str] = _NO_TIES, whole: tuple[str, ...] = ()) -> None:
    """Replace the full parameters of ``layers`` by this rank's pieces. Parameters shared by
    several layers (tied embeddings) become one shared piece when their layouts agree, else
    all users stay replicated. ``foreign``: ids of parameters held by other modules too (those
    modules, for the log), kept whole. ``whole``: further entries for the log of what stays
    whole ("<module>: <why>"), e.g. subclasses that stay serial."""
    grid = current_grid()
    sizes = {a: grid.sizes[a] for a in ("x", "y", "z")}
    if sizes == {"x": 1, "y": 1, "z": 1}:
        return
    plans, replicated = {}, list(whole)
    for layer in layers:
        specs, why = plan(layer, sizes, min_numel, foreign)
        plans[id(layer)] = specs
        if why:
            replicated.append(f"{layer!r}: {why}")
    users: dict[int, list[tuple[ShardedModule, str]]] = {}
    for layer in layers:
        for name, p in layer._parameters.items():
            if p is not None and spec_of(p) is None:
                users.setdefault(id(p), []).append((layer, name))
    for shared in users.values():
        layouts = {plans[id(layer)].get(name) for layer, name in shared}
        if len(layouts) > 1:
            for layer, name in shared:
                if plans[id(layer)]:
                    replicated.append(f"{layer!r}: its {name} is tied to a layer with another layout")
                plans[id(layer)] = {}
    if replicated:
        msg = f"auto_parallelize: {len(replicated)} layer(s) stay replicated on x={sizes['x']} " \
              f"y={sizes['y']} z={sizes['z']}:\n  " + "\n  ".join(replicated)
        if strict:
            raise ValueError(msg + "\nchoose a grid that divides these dimensions, untie or parallelise "
                                   "these modules, or pass strict=False")
        if grid.rank == 0:
            log.warning(msg)
    pieces: dict[int, nn.Parameter] = {}
    prefetcher = Prefetcher()
    for layer in layers:
        if plans[id(layer)]:
            layer.prefetcher = prefetcher
            layer.bind(grid)
        for name, spec in plans[id(layer)].items():
            full = layer._parameters[name]
            if id(full) not in pieces:
                pieces[id(full)] = make_local(full, spec, grid, full.requires_grad)
            layer._parameters[name] = pieces[id(full)]
        bias = layer._parameters.get("bias")
        if plans[id(layer)] and bias is not None and spec_of(bias) is None and sizes["y"] > 1:
            # A tied bias kept whole: each y rank adds (and gets a gradient for) its own slice.
            set_grad_axes(bias, ("dp", "z", "y"))


@contextmanager
def auto_parallelize(*, strict: bool = False, min_numel: int = 0, chain: bool = True,
                     reshard_after_forward: bool = True, overlap_chunks: int = 2) -> Iterator[None]:
    """Build ``nn.Linear`` / ``nn.Embedding`` / HF ``Conv1D`` inside the block as 3D-parallel
    layers over the current grid's x, y and z axes; they are sharded when the block exits.

    ``strict``: raise instead of logging when a layer has to stay replicated.
    ``min_numel``: layers with fewer weight elements stay replicated (logged).
    ``chain``: at the model's first forward, find layers whose output reaches the next layer
    through elementwise ops only (an MLP's up/gate -> down) and let them hand over feature
    blocks instead of full activations (``autochain``; logged once). False keeps every layer
    in the full-feature layout.
    ``reshard_after_forward``: with z > 1, a layer's (or fused experts module's) z-gathered
    weight block is freed after its forward and gathered again in backward, so weights cost
    1/(x*y*z) plus one layer's block at peak; False keeps every block until its backward
    (1/(x*y) at peak, one gather fewer per layer and step).
    ``overlap_chunks``: a layer whose output is summed over x (or y) multiplies its input in up
    to this many row chunks of at least ``comm.OVERLAP_MIN_ROWS`` tokens, and each chunk's
    all-reduce runs while the next one multiplies; 1 multiplies and all-reduces in one piece.
    Build the optimizer / ``autopar.parallelize`` after the block.
    """
    current_grid()  # fail early, on every rank, when autopar.init was not called
    if not isinstance(overlap_chunks, int) or isinstance(overlap_chunks, bool) or overlap_chunks < 1:
        raise ValueError(f"auto_parallelize(overlap_chunks={overlap_chunks!r}): expected a positive integer")
    _install()
    stack = _recording.__dict__.setdefault("stack", [])
    block = _Block()
    # parameter id -> (parameter, {module id: (module, attribute name)}), every registration in the block
    holders: dict[int, tuple[weakref.ref, dict[int, tuple[weakref.ref, str]]]] = {}

    def registered(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            entry = holders.get(id(param))
            if entry is None or entry[0]() is not param:  # an id reused after a parameter died
                entry = holders[id(param)] = (weakref.ref(param), {})
            entry[1][id(module)] = (weakref.ref(module), name)

    stack.append(block)
    hook = nn.modules.module.register_module_parameter_registration_hook(registered)
    try:
        yield
    finally:
        hook.remove()
        stack.pop()  # blocks nest strictly within a thread, so ours is the innermost
    layers = [m for m in block.built if isinstance(m, ShardedModule) and "weight" in m._parameters]
    ours = {id(m) for m in block.built}
    live = {pid: (ref(), {mid: (m(), n) for mid, (m, n) in mods.items() if m() is not None})
            for pid, (ref, mods) in holders.items() if ref() is not None}
    foreign = {pid: ", ".join(f"{type(m).__name__}.{n}" for mid, (m, n) in mods.items() if mid not in ours)
               for pid, (_, mods) in live.items() if set(mods) - ours}
    experts = plan_experts(live, min_numel)
    whole = [f"{m!r}: {why}" for m, why in block.serial] + experts.whole + \
        _large_outside(live, ours | {id(m) for m, _ in block.serial} | experts.found)
    shard_layers(layers, strict=strict, min_numel=min_numel, foreign=foreign, whole=tuple(whole))
    experts.apply()
    for layer in [*layers, *experts.shard]:
        layer.reshard_after_forward = reshard_after_forward
    for layer in layers:
        layer.overlap_chunks = overlap_chunks
    if chain:  # twins of subclasses add work after the base forward: they keep full features
        exact = set(_swaps.values())
        watch([m for m in layers if type(m) in exact and not isinstance(m, Embedding) and spec_of(m.weight) is not None])


def _large_outside(live: Mapping[int, tuple[nn.Parameter, Mapping[int, tuple[nn.Module, str]]]],
                   logged: set[int]) -> list[str]:
    """Log entries for modules holding more than ``LARGE_SHARE`` of the block's parameter
    elements in parameters that no module in ``logged`` (parallel layers, and subclasses
    already logged) holds: they stay whole on every rank."""
    total = sum(p.numel() for p, _ in live.values())
    outside: dict[int, tuple[nn.Module, list[tuple[str, nn.Parameter]]]] = {}
    for p, mods in live.values():
        if mods and not set(mods) & logged:
            module, name = next(iter(mods.values()))
            outside.setdefault(id(module), (module, []))[1].append((name, p))
    found = []
    for module, params in outside.values():
        numel = sum(p.numel() for _, p in params)
        if total and numel > LARGE_SHARE * total:
            shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in params)
            found.append(f"{type(module).__name__} ({shapes}): {numel / total:.0%} of the parameters built here, "
                         "in no nn.Linear / nn.Embedding / Conv1D / fused experts (stays whole)")
    return found


def materialize(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Allocate a model built under ``torch.device("meta")`` + ``auto_parallelize`` on
    ``device`` (default: the grid's) and initialise every parallel layer from a full-size draw
    of its default init, one layer at a time. Other parameters get their module's
    ``reset_parameters`` when it has one; buffers are allocated but not filled."""
    device = torch.device(device) if device is not None else current_grid().device
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) not in fresh:
                fresh[id(p)] = nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
                fresh[id(p)].__dict__.update(p.__dict__)  # keeps the shard spec and grad tags
            if p is not None:
                module._parameters[name] = fresh[id(p)]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty_like(b, device=device)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model
