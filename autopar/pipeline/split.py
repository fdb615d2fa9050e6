"""Finding a model's units and the cost-balanced split, decided before training.

A *unit* is the smallest piece the pipeline moves between stages: one of the model's repeated
blocks (the ``nn.ModuleList`` holding most parameters), or another submodule with parameters next
to them (embeddings, final norm, head). Modules on the path from the root to the blocks are
*expanded*: their own ``forward`` stays as written and runs on every stage as glue code (masks,
position ids, residual adds, the loss), so every real input (``input_ids``, ``attention_mask``,
``labels``, ``pixel_values``...) and every non-tensor value keeps flowing as the author wrote it.
Parameters that expanded modules own themselves (CLIP's ``logit_scale``) are *glue parameters*;
they live on the last stage, where the loss glue runs, unless a trace shows another use.

Units are cut in call order, as one trace (``trace``) finds it, by forward FLOPs plus a
per-parameter charge (``PARAM_COST``). Every later trace (a new microbatch shape) checks that the
call order still keeps each stage contiguous and each glue parameter where it is used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from .trace import FINAL, Flow, UntraceableModel, fix_hint

log = logging.getLogger("autopar")

PARAM_COST = 6.0
"""FLOP-equivalents charged per parameter on top of the forward FLOPs of one microbatch: the
optimizer update, gradient sync and memory of a parameter do not show up in FLOPs. This is what
gives an embedding (a lookup: no FLOPs, many parameters) its weight."""


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
                               f"repeated layers to split between stages; {fix_hint()}")
    return [max(containers)[1]]


@dataclass
class Units:
    names: list[str]
    modules: list[nn.Module]
    layers: int  # how many of them are repeated blocks (or user-defined stages)
    glue: dict[str, nn.Parameter]  # parameters the expanded modules use themselves
    starts: list[int]  # units that begin user-given stages 1.. (split_points), in the user's order


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
    glue = {f"{name}.{n}" if name else n: p for name in sorted(expanded, key=list(modules).index)
            for n, p in modules[name]._parameters.items() if p is not None}
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
    starts = []
    for point in split_points or ():
        if point not in names:
            raise ValueError(f"split point {point!r} holds no parameters; name a module with parameters")
        starts.append(names.index(point))
    return Units(names, units, layers, glue, starts)


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
    """Cost of each unit in ``flow``'s call order."""
    return [flow.flops[pos] + PARAM_COST * _params(units.modules[u]) for pos, u in enumerate(flow.order)]


def assign_chunks(units: Units, order: list[int], costs: list[float], chunks: int) -> dict[int, int]:
    """Chunk of every unit in ``order``: cut at the user's split points, else cost-balanced."""
    if units.starts:
        starts = [order.index(u) if u in order else -1 for u in units.starts]
        if starts != sorted(set(starts)) or starts[0] <= 0:
            raise ValueError("split_points must follow the order in which the forward calls them, "
                             "and not name the first module")
        bounds = [0, *starts, len(order)]
    else:
        bounds = partition(costs, chunks)
    return {u: c for c in range(chunks) for u in order[bounds[c]:bounds[c + 1]]}


def call_bounds(units: Units, flow: Flow, chunk_of: dict[int, int], chunks: int,
                glue_owners: dict[str, set[int]], pp: int) -> list[int]:
    """Stage boundaries in ``flow``'s call positions; raises if the traced call order does not
    keep each stage's units together, or a glue parameter is used away from its stages."""
    seq = []
    for pos, u in enumerate(flow.order):
        if u not in chunk_of:
            raise UntraceableModel(f"{units.names[u]} was not called when the split was made; pass "
                                   f"sample_batch= to autopar.parallelize, or {fix_hint()}")
        seq.append(chunk_of[u])
    if seq != sorted(seq) or set(seq) != set(range(chunks)):
        shown = ", ".join(f"{units.names[u]}:{c}" for u, c in zip(flow.order, seq))
        raise UntraceableModel(f"the forward calls the units in an order that does not keep the "
                               f"stages contiguous ({shown}); pass sample_batch= to "
                               f"autopar.parallelize so the split follows the call order, or {fix_hint()}")
    bounds = [seq.index(c) for c in range(chunks)] + [len(seq)]
    for name, positions in flow.glue_uses.items():
        stages = {(chunks - 1 if p == FINAL else seq[p]) % pp for p in positions}
        if not stages <= glue_owners[name]:
            raise UntraceableModel(f"parameter {name!r} is used by the model's own forward on pipeline "
                                   f"stage(s) {sorted(stages)} but lives on {sorted(glue_owners[name])}; "
                                   f"pass sample_batch= to autopar.parallelize to place it, or {fix_hint()}")
    return bounds


def log_split(units: Units, order: list[int], chunk_of: dict[int, int], costs: list[float], chunks: int) -> str:
    lines = ["pipeline split (stage: units, params, cost share):"]
    total = sum(costs) or 1.0
    for s in range(chunks):
        mine = [pos for pos, u in enumerate(order) if chunk_of.get(u) == s]
        names = [units.names[order[p]] for p in mine]
        shown = names if len(names) <= 3 else [names[0], f"... ({len(names) - 2} more)", names[-1]]
        params = sum(_params(units.modules[order[p]]) for p in mine)
        share = sum(costs[p] for p in mine) / total
        lines.append(f"  {s}: {', '.join(shown)} | {params} | {share:.1%}")
    text = "\n".join(lines)
    log.info(text)
    return text
