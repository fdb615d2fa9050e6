"""Fused MoE expert tensors (transformers 5's ``@use_experts_implementation`` classes), sharded.

transformers 5 stores a layer's experts as a few 3-D parameters whose first dimension is the
expert (Mixtral's ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), Qwen2/3-MoE alike,
biases (E, out)); there is no ``nn.Linear`` inside for ``auto`` to catch. They are sharded here:

* **x, y: whole experts per rank.** Rank ``r = y*X + x`` of the x·y group holds experts
  ``r*E/(XY) : (r+1)*E/(XY)``. Activations between layers are full-feature and replicated over
  x and y (``layers``), and x·y ranks share one batch slice, so every x·y rank already has every
  token and the same routing: each runs only the (token, expert) pairs of its own experts
  (the rest are mapped to the sentinel id ``num_experts`` that the ``grouped_mm`` and
  ``batched_mm`` implementations skip, as transformers' own expert parallelism does, with
  their weights zeroed; a class's own "eager" forward may not take the sentinel, gpt-oss's
  ``one_hot(num_classes=num_experts)`` does not, so under eager they go to local expert 0
  with weight 0, which adds exact zeros) and the
  partial outputs are summed by one all-reduce over x·y. Adjoints: the output all-reduce's is
  the identity (its gradient is replicated); the input copy's is an all-reduce over x·y of the
  gradients of the hidden states and of the routing weights, each of which only the ranks
  holding a token's experts contributed to. With top_k <= 2 every sum has at most two non-zero
  terms, so forward and backward are bit-identical to serial on the same batch.
* **z: each rank's expert block split ZeRO-3 style**, like a ``Linear`` weight: flattened,
  zero-padded, one piece per z rank, all-gathered (``comm.depth_gather``) at every forward on
  every z rank (before any data-dependent routing, so the collectives always match) and its
  gradient reduce-scattered, which sums the z ranks' batch slices; so the pieces' gradients are
  summed over ``dp`` only. Per rank: 1/(x·y·z) of the expert elements, the grid's ideal. The
  gathered blocks are freed after forward and gathered again in backward (``regather``), as a
  ``Linear``'s are, unless ``auto_parallelize(reshard_after_forward=False)``.

Nothing is copied or re-laid out between ranks at run time beyond those two all-reduces and the
depth gather, so expert parallelism with all-to-all (ranks of another axis keep disjoint tokens,
send each (token, expert) pair to the expert's rank and back) can later replace the all-reduce
pair without touching the parameter layout (``ExpertSpec``) or the checkpoints.

A module whose experts do not divide over x·y, whose parameters are not all per-expert, that
holds submodules with parameters, whose parameters another module holds too, or that
transformers already made expert-parallel stays whole, named in ``auto_parallelize``'s log
(raised with ``strict=True``). The router is a module of its own (replicated; an ``nn.Linear``
router is sharded as one).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..runtime.grid import Grid
from ..runtime.params import set_grad_axes, set_shard_axes
from ..runtime.state import current_grid
from .comm import COUNTER, depth_gather, stand_in
from .layers import LoadsFullTensors, gather_full, spec_of
from .regather import BlockRegather

_INTERFACE = ("hidden_states", "top_k_index", "top_k_weights")  # by position: gpt-oss names them otherwise

Live = Mapping[int, tuple[nn.Parameter, Mapping[int, tuple[nn.Module, str]]]]
"""``auto``'s record of the block: parameter id -> (parameter, {module id: (module, name)})."""


@dataclass(frozen=True)
class ExpertSpec:
    """The layout of one per-expert tensor: dim 0 cut in ``X*Y`` contiguous runs of experts
    (run ``y*X + x`` on rank (x, y)), and with ``depth`` that block flattened, zero-padded and
    split over z. Same duck-typed protocol as ``layout.ShardSpec`` (``full_shape``, ``axes``,
    ``block_slices``, ``block_numel``, ``local_numel``, ``depth``, ``shard``, ``assemble``),
    which is all that checkpoints and ``gather_full`` use."""

    full_shape: tuple[int, ...]
    depth: bool
    sizes: tuple[tuple[str, int], ...]  # the (x, y, z) sizes the layout was made for

    @property
    def axis_sizes(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def axes(self) -> tuple[str, ...]:
        n = self.axis_sizes
        return tuple(a for a in ("z", "y", "x") if n[a] > 1 and (a != "z" or self.depth))

    @property
    def runs(self) -> int:
        return self.axis_sizes["x"] * self.axis_sizes["y"]

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.full_shape[0] // self.runs, *self.full_shape[1:])

    @property
    def block_numel(self) -> int:
        return math.prod(self.block_shape)

    @property
    def local_numel(self) -> int:
        return -(-self.block_numel // self.axis_sizes["z"]) if self.depth else self.block_numel

    @property
    def local_shape(self) -> tuple[int, ...]:
        return (self.local_numel,) if self.depth else self.block_shape

    def block_slices(self, coords: Mapping[str, int]) -> tuple[slice, ...]:
        run, b = coords["y"] * self.axis_sizes["x"] + coords["x"], self.block_shape[0]
        return (slice(run * b, (run + 1) * b),) + (slice(None),) * (len(self.full_shape) - 1)

    def shard(self, full: Tensor, coords: Mapping[str, int]) -> Tensor:
        """The local piece of ``full`` for the rank at ``coords`` (a fresh contiguous tensor)."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(f"expected a tensor of the full shape {self.full_shape}, got {tuple(full.shape)}")
        block = full[self.block_slices(coords)]
        if not self.depth:
            return block.contiguous().clone()
        k, flat = self.local_numel, block.reshape(-1)
        start, stop = coords["z"] * k, min((coords["z"] + 1) * k, flat.numel())
        piece = flat.new_zeros(k)
        if stop > start:
            piece[:stop - start] = flat[start:stop]
        return piece

    def assemble(self, pieces: Tensor) -> Tensor:
        """Inverse of ``shard``: ``pieces[i]`` is the piece of position ``i`` of ``group(*axes)``
        ((z, y, x) mixed radix, so position ``z*X*Y + run``)."""
        depth = self.axis_sizes["z"] if self.depth else 1
        flat = pieces.reshape(depth, self.runs, self.local_numel).transpose(0, 1).reshape(self.runs, -1)
        return flat[:, :self.block_numel].reshape(self.full_shape)


class _CopyIn(torch.autograd.Function):
    """Identity on an input replicated over x·y that each rank uses for its own experts only:
    its gradient is the sum over x·y of the ranks' partial gradients."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, grid: Grid) -> Tensor:
        ctx.grid = grid
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return _sum_xy(g.contiguous().clone(), ctx.grid), None


class _SumOut(torch.autograd.Function):
    """Sum of the ranks' partial expert outputs over x·y; its gradient is already replicated."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, grid: Grid) -> Tensor:
        return _sum_xy(t.contiguous().clone(), grid)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return g, None


def _sum_xy(t: Tensor, grid: Grid) -> Tensor:
    COUNTER.add("all_reduce[y,x]", t, grid.size("x", "y"), 2.0)
    dist.all_reduce(t, group=grid.group("x", "y"))
    return t


class ShardedExperts(LoadsFullTensors):
    """Mixed in front of a fused experts class (``parallel_class``): runs the class's own forward
    on this rank's experts, and gives checkpoints the full tensors. ``_autopar_experts``: the
    first global expert id held here and how many."""

    _autopar_experts: tuple[int, int]
    reshard_after_forward = True  # False: the gathered z blocks stay saved until backward (regather)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        grid = self.autopar_grid
        start, count = self._autopar_experts
        split = grid.size("x", "y") > 1
        if split:
            hidden_states, top_k_weights = _CopyIn.apply(hidden_states, grid), _CopyIn.apply(top_k_weights, grid)
            local = top_k_index - start
            off = (local < 0) | (local >= count)
            eager = getattr(getattr(self, "config", None), "_experts_implementation", None) in (None, "eager")
            top_k_index = local.masked_fill(off, 0 if eager else count)
            top_k_weights = top_k_weights.masked_fill(off, 0)
        pieces = {n: p for n, p in self._parameters.items() if p is not None and spec_of(p) is not None
                  and spec_of(p).depth}
        blocks = {n: depth_gather(p, grid, spec_of(p).block_shape) for n, p in pieces.items()}  # every z rank,
        self._parameters.update(blocks)  # every time: no routing decides it
        regather = None
        # Not under torch.compile: its graph keeps what backward needs, and saved-tensor hooks that
        # gather again are not traceable.
        if (self.reshard_after_forward and blocks and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not stand_in(next(iter(blocks.values())))):
            regather = BlockRegather(grid, pieces, blocks)
        try:
            with regather.saving() if regather is not None else contextlib.nullcontext():
                out = super().forward(hidden_states, top_k_index, top_k_weights)
        finally:
            self._parameters.update(pieces)
        if regather is not None:
            out = regather.gather_first(out)
        return _SumOut.apply(out, grid) if split else out

    def autopar_full_state(self) -> dict[str, Tensor]:
        out = {n: p if spec_of(p) is None else gather_full(p.detach().reshape(-1), spec_of(p), self.autopar_grid)  # gloo: 1-D
               for n, p in self._parameters.items() if p is not None}
        out.update((n, b) for n, b in self._buffers.items() if b is not None and n not in self._non_persistent_buffers_set)
        return out



@functools.cache
def parallel_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``Parallel<cls>``: ``ShardedExperts`` in front of ``cls`` (built once per class), so that
    ``isinstance`` checks on ``cls`` and its own forward and init code keep working."""
    return type(f"Parallel{cls.__name__}", (ShardedExperts, cls),
                {"__module__": cls.__module__, "__qualname__": f"Parallel{cls.__qualname__}"})


def is_fused_experts(module: nn.Module) -> bool:
    """A ``@use_experts_implementation`` module (its init sets ``_is_expert_parallel``) that
    counts its experts in ``num_experts``."""
    return "_is_expert_parallel" in module.__dict__ and isinstance(getattr(module, "num_experts", None), int) \
        and not isinstance(module, ShardedExperts)


def why_whole(module: nn.Module, live: Live, sizes: Mapping[str, int], min_numel: int) -> str:
    """Why the fused experts ``module`` must keep its tensors whole ("" if it can be sharded)."""
    experts, runs = module.num_experts, sizes["x"] * sizes["y"]
    own = {n: p for n, p in module._parameters.items() if p is not None}
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if module._is_expert_parallel:
        return "transformers already made it expert-parallel"
    if len(params) != len(_INTERFACE) or any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return f"its forward takes {tuple(p.name for p in params)}, not the three positional {_INTERFACE}"
    if any(p is not None for c in module.children() for p in c.parameters()):
        return "it holds submodules with parameters"
    if not own:
        return "it has no parameters"
    for name, p in own.items():
        if p.dim() < 2 or p.shape[0] != experts:
            return f"its {name} {tuple(p.shape)} is not per-expert (num_experts={experts})"
        holders = live.get(id(p), (None, {}))[1]
        others = [f"{type(m).__name__}.{n}" for m, n in holders.values() if m is not module]
        if others:
            return f"its {name} is tied to {', '.join(others)} (kept whole, so the tie survives)"
    if sum(p.numel() for p in own.values()) < min_numel:
        return f"smaller than min_numel={min_numel}"
    if experts % runs:
        return f"{experts} experts do not divide over x*y = {runs}"
    return ""


@dataclass
class ExpertsPlan:
    """What ``plan_experts`` found in a block: ``found``, ids of every fused experts module;
    ``shard``, those to shard; ``whole``, log entries for the others."""

    found: set[int] = field(default_factory=set)
    shard: list[nn.Module] = field(default_factory=list)
    whole: list[str] = field(default_factory=list)

    def apply(self) -> None:
        """Swap each planned module's parameters for this rank's pieces (tagged for gradient
        sync and clipping) and its class for ``parallel_class``."""
        grid = current_grid()
        sizes = tuple((a, grid.sizes[a]) for a in ("x", "y", "z"))
        for module in self.shard:
            runs = grid.size("x", "y")
            count = module.num_experts // runs
            for name, full in list(module._parameters.items()):
                if full is None:
                    continue
                spec = ExpertSpec(tuple(full.shape), grid.sizes["z"] > 1, sizes)
                local = nn.Parameter(spec.shard(full.detach(), grid.coords), requires_grad=full.requires_grad)
                local._autopar_spec = spec
                set_shard_axes(local, spec.axes)
                set_grad_axes(local, ("dp",) if spec.depth else ("dp", "z"))
                module._parameters[name] = local
            module._autopar_experts = (grid.index("y", "x") * count, count)
            if runs > 1:
                module.num_experts, module._is_expert_parallel = count, True
            module.__class__ = parallel_class(type(module))
            module.bind(grid)


def plan_experts(live: Live, min_numel: int = 0) -> ExpertsPlan:
    """The fused experts modules that registered parameters in an ``auto_parallelize`` block,
    and which of them are sharded over the current grid."""
    grid = current_grid()
    sizes = {a: grid.sizes[a] for a in ("x", "y", "z")}
    plan = ExpertsPlan()
    modules = {id(m): m for _, mods in live.values() for m, _ in mods.values()}
    for module in modules.values():
        if not is_fused_experts(module):
            continue
        plan.found.add(id(module))
        if sizes == {"x": 1, "y": 1, "z": 1}:
            continue
        why = why_whole(module, live, sizes, min_numel)
        if why:
            shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in module._parameters.items() if p is not None)
            plan.whole.append(f"{type(module).__name__} ({shapes}): {why}")
        else:
            plan.shard.append(module)
    return plan
