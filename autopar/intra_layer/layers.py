"""3D tensor-parallel ``Linear``, ``Embedding`` and Hugging Face ``Conv1D``.

Each class subclasses the layer it replaces, so ``isinstance`` checks, ``extra_repr`` and HF's
init/tying code keep working. A layer is built exactly like the serial one (full weight, same
RNG draws); ``auto.shard_layers`` then swaps its parameters for local pieces carrying a
``ShardSpec`` (see ``layout``). Until then, or when a layer stays replicated, ``forward`` is the
serial one.

Sharded forward of ``y = x W^T + b`` for a rank at (x, y, z) with its batch slice (dp, z):

    W_yx = all-gather_z(piece)                  # (out/Y, in/X) block; grad reduce-scattered over z
    h    = x[..., in-block of x]                # input is replicated over x and y; grad all-gathered over x
    h    = h @ W_yx^T                           # grad wrt h all-reduced over y, overlapped with dW
    h    = all-reduce_x(h) + b_y                # bias: this rank's y slice of it
    out  = all-gather_y(h)                      # back to full features; grad: own slice

so input and output are ordinary full-feature activations and the layer can stand anywhere
(``chain`` switches pairs of layers to handing over feature blocks instead). Every collective's
size follows from shapes alone (x and y ranks share one batch slice), so there is no host sync.
Parameter tags: the weight piece is partitioned over (z, y, x) and, its z-sum being done by
the reduce-scatter, its grad is summed over ``dp`` only. The bias is cut over y with the
output (``layout.bias_spec``); its x ranks hold equal copies with equal gradients, so its grad
is summed over (dp, z) and its norm over y. A bias that a non-parallel module holds too (BERT's
``cls.predictions.bias`` is the decoder's bias) stays whole, so the tie survives: each y rank
then adds its own slice and gets a gradient for it alone (zeros elsewhere), so its grad is
summed over (dp, z, y).
"""
from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime.grid import Grid
from ..runtime.params import set_grad_axes, set_shard_axes
from ..runtime.state import current_grid, is_initialized
from .comm import (all_gather_flat, all_reduce, depth_gather, depth_matmul, drop_last, gather_last, matmul,
                   matmul_dtype, slice_last, stand_in)
from .layout import ShardSpec
from .prefetch import Prefetcher


def spec_of(param: Tensor | None) -> ShardSpec | None:
    """The layout of a sharded parameter, None for a full (replicated) one."""
    return getattr(param, "_autopar_spec", None)


def gather_full(param: Tensor, spec: ShardSpec, grid: Grid) -> Tensor:
    """The full serial tensor of a sharded parameter (collective over ``spec.axes``)."""
    local = param.detach().contiguous()
    n = grid.size(*spec.axes)
    pieces = local.new_empty(n * local.numel())
    all_gather_flat(pieces, local, group=grid.group(*spec.axes))
    return spec.assemble(pieces.view(n, -1))


def make_local(full: Tensor, spec: ShardSpec, grid: Grid, requires_grad: bool) -> nn.Parameter:
    local = nn.Parameter(spec.shard(full.detach(), grid.coords), requires_grad=requires_grad)
    local._autopar_spec = spec
    set_shard_axes(local, spec.axes)
    set_grad_axes(local, ("dp",) if spec.depth else ("dp", "z"))
    return local


class LoadsFullTensors(nn.Module):
    """A module whose parameters may be sharded over the grid it was sharded on (``bind``):
    its forward runs on that grid, never on whichever one is current, and ``load_state_dict``
    of full (serial) tensors cuts each to this rank's piece (by its spec) on the way in; local
    pieces load as they are.

    The grid is held weakly, as everything that may outlive ``autopar.destroy`` holds groups: a
    destroyed gloo group keeps its threads until its last reference dies, and a model often
    outlives its grid. Copies (``copy.deepcopy``, pickling) bind to the live grid when they
    are made, the only one whose groups can run them."""

    def bind(self, grid: Grid) -> None:
        """Run this module on ``grid`` (what ``shard_layers`` sharded it for)."""
        self.__dict__["_autopar_grid"] = weakref.ref(grid)

    @property
    def autopar_grid(self) -> Grid:
        ref = self.__dict__.get("_autopar_grid")
        grid = ref() if ref is not None else None
        if grid is None:
            raise RuntimeError(f"{type(self).__name__} is sharded for a grid that is gone (autopar.destroy() "
                               "tore it down, or this copy was made with no grid initialised); build and "
                               "shard the model again after autopar.init")
        return grid

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # nn.Module's drops a compiled call (``compile()``)
        state.pop("_autopar_grid", None)  # a weak reference: neither copied nor pickled
        # ``copy.deepcopy`` of a Parameter keeps only its data: its spec and sync tags go with us.
        state["_autopar_param_tags"] = {n: {k: v for k, v in vars(p).items() if k.startswith("_autopar_")}
                                        for n, p in self._parameters.items() if p is not None}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        tags = state.pop("_autopar_param_tags", {})
        super().__setstate__(state)
        for name, attrs in tags.items():
            if self._parameters.get(name) is not None:
                self._parameters[name].__dict__.update(attrs)
        if is_initialized():
            self.bind(current_grid())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        replaced = {}
        for name, p in self._parameters.items():
            spec, key = spec_of(p), prefix + name
            if spec is not None and key in state_dict and tuple(state_dict[key].shape) == spec.full_shape:
                replaced[key] = state_dict[key]
                state_dict[key] = spec.shard(state_dict[key], self.autopar_grid.coords)
        try:
            super()._load_from_state_dict(state_dict, prefix, *args)
        finally:
            state_dict.update(replaced)


class ShardedModule(LoadsFullTensors):
    """Full-tensor views of a layer whose parameters may be sharded: ``autopar_full_state`` for
    ``autopar.full_state_dict``, ``load_state_dict`` of full (serial) tensors, and re-init
    (``reset_parameters``) that draws full-size tensors so the RNG stream matches serial."""

    in_sharded = False   # input arrives as this rank's block of features (set by ``chain``)
    out_sharded = False  # output leaves as this rank's block of features (set by ``chain``)
    prefetcher: Prefetcher | None = None  # shared by the layers of one auto_parallelize block

    reshard_after_forward = True  # False: keep the z-gathered block for backward (see comm.depth_matmul)
    overlap_chunks = 2  # row chunks whose output all-reduces overlap the next chunk's matmul (comm._product)

    def gather_dtype(self) -> torch.dtype:
        """The dtype this layer's weight is gathered over z in: its matmul's."""
        return matmul_dtype(self.weight)

    def _prefetched(self, grid: Grid) -> Tensor | None:
        # None while the pipeline traces, and under torch.compile: the prefetcher's bookkeeping
        # and async gathers are Python state no graph can hold.
        if self.prefetcher is None or torch.compiler.is_compiling() or stand_in(self.weight):
            return None
        return self.prefetcher.gathered(self, grid)

    def full_block(self, spec: ShardSpec, grid: Grid) -> Tensor:
        """This rank's (y, x) block of the weight, gathered over z (prefetched when possible)."""
        gathered = self._prefetched(grid) if grid.size("z") > 1 else None
        return depth_gather(self.weight, grid, spec.block_shape, gathered)

    def block_matmul(self, h: Tensor, spec: ShardSpec, grid: Grid, reduce_axis: str, transposed: bool,
                     sum_axis: str) -> Tensor:
        """``h`` times this rank's weight block, summed over ``sum_axis`` (the input features'),
        its input gradient all-reduced over ``reduce_axis``."""
        if grid.size("z") == 1:
            return matmul(h, self.weight.view(spec.block_shape), grid, reduce_axis, transposed, sum_axis,
                          self.overlap_chunks)
        return depth_matmul(h, self.weight, grid, reduce_axis, transposed, spec.block_shape,
                            self._prefetched(grid), keep=not self.reshard_after_forward, sum_axis=sum_axis,
                            chunks=self.overlap_chunks)

    def autopar_full_state(self) -> dict[str, Tensor]:
        out = {}
        for name, p in self._parameters.items():
            if p is not None:
                spec = spec_of(p)
                out[name] = p if spec is None else gather_full(p, spec, self.autopar_grid)
        return out

    def serial_init(self) -> None:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        specs = {n: spec_of(p) for n, p in self._parameters.items() if spec_of(p) is not None}
        if not specs:
            return self.serial_init()
        local = dict(self._parameters)
        for n, spec in specs.items():
            self._parameters[n] = nn.Parameter(local[n].new_empty(spec.full_shape))
        try:
            self.serial_init()
            full = {n: self._parameters[n].detach() for n in specs}
        finally:
            self._parameters.update(local)
        coords = self.autopar_grid.coords
        with torch.no_grad():
            for n, spec in specs.items():
                local[n].copy_(spec.shard(full[n], coords))


def feature_axes(spec: ShardSpec, transposed: bool) -> tuple[str, str]:
    """(axis cutting the output features, axis cutting the input features) of a weight."""
    rows, cols = spec.dim_axes
    return (cols, rows) if transposed else (rows, cols)


def linear_3d(layer: "ShardedModule", inp: Tensor, spec: ShardSpec, transposed: bool) -> Tensor:
    """The sharded forward for either weight orientation. ``layer.in_sharded``: ``inp`` is
    already this rank's block of input features; ``layer.out_sharded``: return this rank's
    block of output features (see ``chain``)."""
    grid = layer.autopar_grid
    out_axis, in_axis = feature_axes(spec, transposed)
    h = inp if layer.in_sharded else drop_last(inp, grid, in_axis)
    h = layer.block_matmul(h, spec, grid, out_axis, transposed, sum_axis=in_axis)
    bias = layer.bias
    if bias is None:
        return h if layer.out_sharded else gather_last(h, grid, out_axis)
    whole = spec_of(bias) is None  # y = 1, or tied to a module that is not a parallel layer
    if bias.dtype != h.dtype:  # autocast: F.linear casts the bias too, so the output keeps bf16
        bias = bias.to(h.dtype)
    if out_axis == "y":
        if whole and grid.size("y") > 1:
            bias = slice_last(bias, grid, "y")
        h = h + bias  # this rank's y slice of the output features and of the bias
        return h if layer.out_sharded else gather_last(h, grid, "y")
    # Output features cut over x (a chain swapped this weight); the bias keeps its y layout and
    # its grad tags, so its gradient must again sum to the serial one over exactly those axes
    # (the tags may already be baked into gradient buckets).
    if layer.out_sharded and grid.size("x") > 1:
        # A producer handing off along x, which happens only when y has size 1 (whole bias):
        # each x rank gets its slice's gradient, and the backward all-gather gives the rest.
        if grid.size("y") > 1:
            raise RuntimeError(f"{layer!r}: output blocks cut over x with y > 1 is not a chain layout")
        return h + drop_last(bias, grid, "x")
    h = gather_last(h, grid, "x")
    if grid.size("y") == 1:
        return h + bias
    if not whole:  # assemble the y slices; backward hands each y rank its own slice's gradient
        return h + gather_last(bias, grid, "y")
    # A whole bias tagged to be summed over y: the gradient is the same on every y rank, so
    # only y rank 0 reports it and the sum over y counts it once.
    return h + _OwnGrad.apply(bias, grid.index("y") == 0)


class _OwnGrad(torch.autograd.Function):
    """Identity whose gradient is kept on one rank of an axis and zero on the others."""

    @staticmethod
    def forward(ctx, t: Tensor, own: bool) -> Tensor:
        ctx.own = own
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        return (g if ctx.own else torch.zeros_like(g)), None


class Linear(ShardedModule, nn.Linear):
    def serial_init(self) -> None:
        nn.Linear.reset_parameters(self)

    def forward(self, input: Tensor) -> Tensor:
        spec = spec_of(self.weight)
        if spec is None:
            return super().forward(input)
        return linear_3d(self, input, spec, transposed=False)


class Embedding(ShardedModule, nn.Embedding):
    """Vocabulary rows over y, embedding columns over x, the block over z. A rank looks up the
    ids that fall in its rows (zeros elsewhere) and the y all-reduce assembles each vector."""

    def serial_init(self) -> None:
        nn.Embedding.reset_parameters(self)

    def gather_dtype(self) -> torch.dtype:
        return self.weight.dtype  # autocast leaves embedding lookups in the weight's dtype

    def forward(self, input: Tensor) -> Tensor:
        spec = spec_of(self.weight)
        if spec is None:
            return super().forward(input)
        grid = self.autopar_grid
        w = self.full_block(spec, grid)
        rows = spec.block_shape[0]
        start = grid.index("y") * rows
        pad = self.padding_idx
        pad = pad - start if pad is not None and start <= pad < start + rows else None
        if grid.size("y") == 1:
            out = F.embedding(input, w, pad)
        else:
            local = input - start
            outside = (local < 0) | (local >= rows)
            out = F.embedding(local.masked_fill(outside, 0), w, pad)
            out = all_reduce(out.masked_fill(outside.unsqueeze(-1), 0), grid, "y")
        return gather_last(out, grid, "x")


@functools.cache
def conv1d_class() -> type[nn.Module]:
    """The parallel twin of ``transformers.pytorch_utils.Conv1D`` (built on first use so that
    importing autopar does not import transformers)."""
    from transformers.pytorch_utils import Conv1D as HFConv1D

    class Conv1D(ShardedModule, HFConv1D):
        """GPT-2's linear layer, weight stored ``in x out``: the same 3D matmul with the block
        of rows (in) over x and columns (out) over y."""

        def serial_init(self) -> None:
            nn.init.normal_(self.weight, std=0.02)
            nn.init.zeros_(self.bias)

        def forward(self, x: Tensor) -> Tensor:
            spec = spec_of(self.weight)
            if spec is None:
                return super().forward(x)
            return linear_3d(self, x, spec, transposed=True)

    Conv1D.__module__, Conv1D.__qualname__ = __name__, "Conv1D"
    return Conv1D


def __getattr__(name: str) -> Any:
    """``layers.Conv1D`` resolves lazily, so pickles of GPT-2 models find the class."""
    if name == "Conv1D":
        return conv1d_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
