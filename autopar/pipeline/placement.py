"""Which stage holds what: stripping other stages' units, and groups for weights shared by stages.

Stripping happens before the model is moved to the device, and the stand-ins are created on the
device directly (a 1-element tensor expanded to the real shape: no storage), so moving the
model afterwards copies only this rank's stage. Modules are never rebuilt, only their tensors
swapped, so a unit may contain tensor-parallel layers and the model keeps its structure (and
its state-dict names) on every rank.

A weight reachable from units of several stages (a tied embedding and LM head), or a glue
parameter the trace found in use on several stages, is kept on each of them; its gradient is
summed over a group of exactly those stages (``Pipeline.sync_tied_grads``), so the copies take
identical steps. Its norm counts once (``mark_norm_duplicate`` on all but the first stage).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.grid import Grid, coords_of, rank_of
from ..runtime.params import mark_norm_duplicate
from ..runtime.state import new_group
from .split import Units

Tied = list[tuple[dist.ProcessGroup, list[nn.Parameter]]]


def place_units(model: nn.Module, units: Units, chunk_of: dict[int, int], glue_owners: dict[str, set[int]],
                grid: Grid, pp: int) -> tuple[list[nn.Parameter], Tied]:
    """Strip what this rank does not hold; returns its trainable parameters and tie groups."""
    rank = grid.coords["pp"]
    owners: dict[int, set[int]] = {}
    by_id: dict[int, nn.Parameter] = {}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for u, chunk in chunk_of.items():
        for p in units.modules[u].parameters():
            owners.setdefault(id(p), set()).add(chunk % pp)
            by_id[id(p)] = p
    for name, p in units.glue.items():
        owners.setdefault(id(p), set()).update(glue_owners[name])
        by_id[id(p)] = p
    params = [by_id[i] for i in by_id if rank in owners[i] and by_id[i].requires_grad]
    stand_ins: dict[int, torch.Tensor] = {}

    def stub(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in stand_ins:
            empty = torch.empty((), dtype=t.dtype, device=grid.device).expand(t.shape)
            if isinstance(t, nn.Parameter):
                replacement = nn.Parameter(empty, requires_grad=False)
                replacement.__dict__.update(t.__dict__)  # shard specs: state-dict names and shapes stay
                stand_ins[id(t)] = replacement
            else:
                stand_ins[id(t)] = empty
        return stand_ins[id(t)]

    for u, module in enumerate(units.modules):
        if u not in chunk_of or chunk_of[u] % pp == rank:  # uncalled units stay everywhere, untrained
            continue
        for sub in module.modules():
            sub._autopar_absent = True
            for slot in (sub._parameters, sub._buffers):
                for name, t in slot.items():
                    if t is not None:  # a tied weight this stage owns elsewhere: stays there only
                        slot[name] = stub(t)
    modules = dict(model.named_modules())
    for name, p in units.glue.items():
        if rank not in glue_owners[name]:
            owner, _, leaf = name.rpartition(".")
            modules[owner]._parameters[leaf] = stub(p)
            modules[owner]._parameters[leaf]._autopar_absent = True  # checkpoints skip it
    return params, _tie_groups(owners, by_id, names, grid)


def _tie_groups(owners: dict[int, set[int]], by_id: dict[int, nn.Parameter], names: dict[int, str],
                grid: Grid) -> Tied:
    """One group per set of stages sharing weights, per (dp, z, y, x) position; built by every
    rank in the same order (``new_group`` is collective)."""
    rank, sizes = grid.coords["pp"], grid.sizes
    tied: Tied = []
    for stages in sorted({tuple(sorted(s)) for s in owners.values() if len(s) > 1}):
        shared = sorted((i for i in owners if tuple(sorted(owners[i])) == stages), key=lambda i: names[i])
        for base in range(grid.world_size):
            c = coords_of(base, sizes)
            if c["pp"] != stages[0]:
                continue
            members = [rank_of({**c, "pp": s}, sizes) for s in stages]
            group = new_group(members)
            if grid.rank in members:
                tied.append((group, [by_id[i] for i in shared]))
        if rank in stages[1:]:
            for i in shared:
                mark_norm_duplicate(by_id[i])
    return tied
