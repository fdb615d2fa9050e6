"""Finding a model's units, recording how data flows between them, and the cost-balanced split.

A *unit* is the smallest piece the pipeline moves between stages: one of the model's repeated
blocks (the ``nn.ModuleList`` holding most parameters), or another submodule with parameters next
to them (embeddings, final norm, head). Modules on the path from the root to the blocks are
*expanded*: their own ``forward`` stays as written and runs on every stage as glue code (masks,
position ids, residual adds, the loss), so every real input (``input_ids``, ``attention_mask``,
``labels``, ``pixel_values``...) and every non-tensor value keeps flowing as the author wrote it.

The model is traced once, at the first step, by running its real forward on the first
microbatch with every unit intercepted (``transformers`` 5 no longer ships an FX tracer, and an
op-level graph would inline the custom backward of tensor-parallel layers; intercepting whole
modules keeps them intact). Each unit's floating outputs are replaced by fresh leaf tensors, so
walking the autograd graph of the glue back from any later input finds exactly which earlier
unit outputs it needs. That gives, for every stage boundary, the tensors that must cross it -
including skip connections that jump over several stages. The same pass counts FLOPs per unit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger("autopar")

PARAM_COST = 6.0
"""FLOP-equivalents charged per parameter on top of the forward FLOPs of one microbatch: the
optimizer update, gradient sync and memory of a parameter do not show up in FLOPs. This is what
gives an embedding (a lookup: no FLOPs, many parameters) its weight."""

Key = tuple[int, int]  # (unit position in call order, index of the tensor in its flattened output)


class TensorMeta(NamedTuple):
    shape: torch.Size
    dtype: torch.dtype


class UntraceableModel(RuntimeError):
    """The model cannot be split automatically; the message names the module and the fix."""


def _fix_hint() -> str:
    return ("pass split_points=[...] to autopar.parallelize: the names of the modules that start "
            "stages 1..S-1 (e.g. ['model.layers.4']), each called once per forward")


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _repeated(module: nn.Module) -> bool:
    kinds = {type(m) for m in module.children()}
    return isinstance(module, (nn.ModuleList, nn.Sequential)) and len(kinds) == 1 and _params(module) > 0


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the containers of repeated blocks ('' for the root itself): every outermost
    ``ModuleList``/``Sequential`` of same-type modules with parameters, so an encoder-decoder
    splits over both stacks. Without one, the container holding most parameters."""
    found: list[str] = []
    for name, module in model.named_modules():
        if _repeated(module) and not any(name.startswith(f"{f}.") or f == "" for f in found):
            found.append(name)
    if found:
        return found
    containers = [(_params(m), n) for n, m in model.named_modules()
                  if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0]
    if not containers:
        raise UntraceableModel(f"{type(model).__name__} has no nn.ModuleList / nn.Sequential of "
                               f"repeated layers to split between stages; {_fix_hint()}")
    return [max(containers)[1]]


@dataclass
class Units:
    names: list[str]
    modules: list[nn.Module]
    layers: int  # how many of them are repeated blocks (or user-defined stages)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts) + 1)]


def find_units(model: nn.Module, split_points: Sequence[str] | None) -> Units:
    """Units in registration order. With ``split_points`` the named modules and their siblings
    become units, so each named module starts a unit boundary."""
    modules = dict(model.named_modules())
    if split_points is not None:
        missing = [s for s in split_points if s not in modules or s == ""]
        if missing:
            raise ValueError(f"split_points {missing} are not submodules of {type(model).__name__}; "
                             f"names look like {list(modules)[1:4]}")
        expanded = {a for s in split_points for a in _ancestors(s)[:-1]}
    else:
        blocks = find_blocks(model)
        expanded = {a for b in blocks for a in _ancestors(b)}
    for name in sorted(expanded):
        own = [n for n, p in modules[name]._parameters.items() if p is not None]
        if own:
            raise UntraceableModel(
                f"module {name or type(model).__name__!r} uses its own parameters {own} in its "
                f"forward, between the submodules to be split; {_fix_hint()}")
    names, units = [], []
    pending = sorted(expanded, key=list(modules).index)
    while pending:
        name = pending.pop(0)
        for child_name, child in modules[name].named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full in expanded or _params(child) == 0:
                continue
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # containers are never called
                pending.append(full)
            else:
                names.append(full)
                units.append(child)
    layers = len(split_points) + 1 if split_points is not None else sum(len(modules[b]) for b in blocks)
    return Units(names, units, layers)


@dataclass
class Flow:
    """What one traced forward taught us, in call order of the units."""
    order: list[int]                      # unit index (registration order) per call position
    specs: list[Any]                      # pytree spec of each unit's output
    leaves: list[list[Any]]               # per output leaf: a TensorMeta, or the value itself
    flops: list[float]                    # forward FLOPs of one microbatch, glue included
    deps: list[set[Key]]                  # unit outputs each call position consumes (glue included)
    final_deps: set[Key] = field(default_factory=set)  # what the loss needs

    def live(self, boundary: int) -> list[Key]:
        """Unit outputs produced before call position ``boundary`` and used at or after it."""
        later = set(self.final_deps).union(*self.deps[boundary:])
        return sorted(k for k in later if k[0] < boundary)


def _sources(values: Any, leaf_keys: dict[int, Key], params: dict[int, str]) -> set[Key]:
    """Unit outputs (as leaf tensors) that the tensors in ``values`` were computed from. Units
    run without autograd while tracing, so a parameter found here is used by the glue code
    itself, outside its module's forward: it would not live on the stage that needs it."""
    found: set[Key] = set()
    seen: set[Any] = set()
    stack = []
    for v in tree_flatten(values)[0]:
        if isinstance(v, torch.Tensor) and v.requires_grad:
            if v.grad_fn is None:
                if id(v) in leaf_keys:
                    found.add(leaf_keys[id(v)])
            else:
                stack.append(v.grad_fn)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) in leaf_keys:
            found.add(leaf_keys[id(var)])
        if var is not None and id(var) in params:
            raise UntraceableModel(f"the model's forward uses parameter {params[id(var)]!r} directly, "
                                   f"outside its module's forward; {_fix_hint()}")
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return found


class Tracer:
    """Runs the model once with every unit intercepted; see the module docstring."""

    def __init__(self, units: Units) -> None:
        self.units = units
        self.params = {id(p): f"{name}.{n}" for name, m in zip(units.names, units.modules)
                       for n, p in m.named_parameters()}
        self.leaf_keys: dict[int, Key] = {}
        self.keep: list[torch.Tensor] = []
        self.flow = Flow([], [], [], [], [])
        self.counter = FlopCounterMode(display=False)
        self.mark = 0

    def call(self, unit: int, forward: Callable, args: tuple, kwargs: dict) -> Any:
        flow = self.flow
        if unit in flow.order:
            raise UntraceableModel(
                f"module {self.units.names[unit]!r} is called twice in one forward (shared weights), "
                f"so it cannot live on a single stage; {_fix_hint()}")
        pos = len(flow.order)
        flow.deps.append(_sources((args, kwargs), self.leaf_keys, self.params))
        # Detached inputs: a view of a grad-requiring leaf taken under no_grad (BERT's pooler
        # slices its input) confuses the FLOP counter's module hooks, and no graph is needed here.
        args, kwargs = tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, (args, kwargs))
        with torch.no_grad():
            out = forward(*args, **kwargs)
        now = self.counter.get_total_flops()
        flow.flops.append(float(now - self.mark))
        self.mark = now
        leaves, spec = tree_flatten(out)
        metas, fresh = [], []
        for j, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                metas.append(TensorMeta(leaf.shape, leaf.dtype))
                t = leaf.detach()
                if t.is_floating_point():
                    t = t.clone().requires_grad_(True)
                    self.leaf_keys[id(t)] = (pos, j)
                    self.keep.append(t)
                fresh.append(t)
            else:
                metas.append(leaf)
                fresh.append(leaf)
        flow.order.append(unit)
        flow.specs.append(spec)
        flow.leaves.append(metas)
        return tree_unflatten(fresh, spec)

    def finish(self, loss: torch.Tensor) -> Flow:
        flow = self.flow
        flow.final_deps = _sources(loss, self.leaf_keys, self.params)
        if flow.flops:
            flow.flops[-1] += float(self.counter.get_total_flops() - self.mark)
        return flow


def partition(costs: Sequence[float], parts: int) -> list[int]:
    """Cut ``costs`` into ``parts`` contiguous non-empty runs minimising the largest run's sum.
    Returns the ``parts + 1`` boundaries. Exact dynamic program, O(parts * n^2): n is a few
    hundred units at most."""
    n = len(costs)
    if parts > n:
        raise ValueError(f"cannot cut {n} units into {parts} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds = [n]
    for k in range(parts, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


def unit_costs(units: Units, flow: Flow) -> list[float]:
    return [flow.flops[pos] + PARAM_COST * _params(units.modules[u]) for pos, u in enumerate(flow.order)]


def forced_bounds(units: Units, flow: Flow, split_points: Sequence[str]) -> list[int]:
    """Stage boundaries at the user's split points (call positions of the named modules)."""
    starts = []
    for name in split_points:
        if name not in units.names:
            raise ValueError(f"split point {name!r} holds no parameters; name a module with parameters")
        starts.append(flow.order.index(units.names.index(name)))
    if starts != sorted(set(starts)) or starts[0] == 0:
        raise ValueError(f"split_points {list(split_points)} must follow the order in which the "
                         "forward calls them, and not name the first module")
    return [0, *starts, len(flow.order)]


def log_split(units: Units, flow: Flow, bounds: list[int], costs: list[float]) -> str:
    lines = ["pipeline split (stage: units, forward GFLOP/microbatch, params, cost share):"]
    total = sum(costs) or 1.0
    for s in range(len(bounds) - 1):
        names = [units.names[flow.order[p]] for p in range(bounds[s], bounds[s + 1])]
        shown = names if len(names) <= 3 else [names[0], f"... ({len(names) - 2} more)", names[-1]]
        flops = sum(flow.flops[bounds[s]:bounds[s + 1]]) / 1e9
        params = sum(_params(units.modules[flow.order[p]]) for p in range(bounds[s], bounds[s + 1]))
        share = sum(costs[bounds[s]:bounds[s + 1]]) / total
        lines.append(f"  {s}: {', '.join(shown)} | {flops:.4f} | {params} | {share:.1%}")
    text = "\n".join(lines)
    log.info(text)
    return text
