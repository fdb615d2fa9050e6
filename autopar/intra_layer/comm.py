"""Collectives as autograd Functions, each paired with its adjoint.

Activations that are *replicated* over an axis carry identical gradients on every replica (the
gradient contract of ``runtime.params``), so the adjoint of gathering a replicated activation is
taking one's own slice, not a sum. Weights are different: the depth (z) ranks see different
batch slices, so the adjoint of the weight all-gather is a reduce-scatter that sums them.

    drop_last    (slice of the last dim)    <->  all-gather of the last dim
    gather_last  (all-gather of last dim)   <->  slice
    all_reduce   (sum over partial results) <->  identity
    depth_gather (all-gather a flat weight) <->  reduce-scatter of its gradient
    matmul       (x @ w.T, its partial sums   <->  all-reduce of dx over the other axis, overlapped
                  all-reduced in place, chunk        with the weight-gradient matmul; the sum's
                  by chunk as the next one           adjoint is the identity
                  multiplies)
    depth_matmul (gather over z, then matmul) <-> gather again, matmul's adjoint, reduce-scatter

``depth_matmul`` exists for memory, not for communication: chained as ``matmul(depth_gather())``
the gathered block is saved for backward, so every layer's full (y, x) block lives until its
backward and weights cost 1/(x*y) at peak. Fused, only the z piece is saved and backward gathers
the block again, as FSDP's ``reshard_after_forward`` does; ``keep=True`` trades that memory for
one gather fewer. Under autocast the piece is cast before it is gathered (half the bytes under
bf16; the same values as casting the gathered block) and its gradient is reduced in the
parameter's dtype.

Every collective has a fixed size known from shapes alone (the ranks of an x or y group share
one batch slice), so none needs a host sync. ``COUNTER`` lets benchmarks count bytes.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ..runtime.collectives import all_gather_flat, reduce_scatter_flat
from ..runtime.grid import Grid


class CommCounter:
    """Bytes each rank sends per collective kind (algorithmic volume, ring algorithms):
    all-gather / reduce-scatter of an n-byte result over p ranks moves n*(p-1)/p, an
    all-reduce 2n*(p-1)/p. Off unless ``enabled``; the benchmarks switch it on."""

    def __init__(self) -> None:
        self.enabled = False
        self.bytes: dict[str, float] = {}

    def add(self, kind: str, tensor: Tensor, p: int, factor: float = 1.0) -> None:
        if self.enabled:
            n = tensor.numel() * tensor.element_size()
            self.bytes[kind] = self.bytes.get(kind, 0.0) + factor * n * (p - 1) / p

    def reset(self) -> None:
        self.bytes = {}


COUNTER = CommCounter()



def _gather_last(t: Tensor, grid: Grid, axis: str) -> Tensor:
    n = grid.size(axis)
    out = t.new_empty((n * t.shape[0], *t.shape[1:]))  # the shape gloo insists on
    all_gather_flat(out, t.contiguous(), group=grid.group(axis))
    COUNTER.add(f"all_gather[{axis}]", out, n)
    return out.view(n, *t.shape).movedim(0, -2).reshape(*t.shape[:-1], n * t.shape[-1])


def slice_last(t: Tensor, grid: Grid, axis: str) -> Tensor:
    k = t.shape[-1] // grid.size(axis)
    return t.narrow(-1, grid.index(axis) * k, k)


def _all_reduce(t: Tensor, grid: Grid, axis: str, async_op: bool = False) -> Any:
    COUNTER.add(f"all_reduce[{axis}]", t, grid.size(axis), 2.0)
    return dist.all_reduce(t, group=grid.group(axis), async_op=async_op)


def stand_in(t: Tensor) -> bool:
    """Whether ``t`` holds no data: a fake tensor of the pipeline's trace, or a dry run's meta
    tensor. False while ``torch.compile`` traces: its tensors are fake then but real when the graph
    runs, and Dynamo refuses to trace ``is_fake`` (a graph break in every layer, after which each
    layer's Functions ran eagerly)."""
    return not torch.compiler.is_compiling() and (t.is_meta or is_fake(t))


class _DropLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, grid: Grid, axis: str) -> Tensor:
        ctx.grid, ctx.axis = grid, axis
        return slice_last(t, grid, axis)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _gather_last(g, ctx.grid, ctx.axis), None, None


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, grid: Grid, axis: str) -> Tensor:
        ctx.grid, ctx.axis = grid, axis
        return _gather_last(t, grid, axis)

    @staticmethod
    def backward(ctx, g: Tensor):
        return slice_last(g, ctx.grid, ctx.axis), None, None


class _AllReduce(torch.autograd.Function):
    """On a copy: summing the caller's fresh partial result in place (``mark_dirty``) would save
    that copy, but under ``torch.compile`` AOTAutograd hands the Function a view of a graph
    output and forbids the in-place change ("view ... modified inplace")."""

    @staticmethod
    def forward(ctx, t: Tensor, grid: Grid, axis: str) -> Tensor:
        t = t.clone()
        _all_reduce(t, grid, axis)
        return t

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None, None


class _DepthGather(torch.autograd.Function):
    """Local flat piece (k,) -> full (y, x) block; backward sums the block gradient over z and
    hands each z rank its piece."""

    @staticmethod
    def forward(ctx, piece: Tensor, grid: Grid, shape: tuple[int, ...], gathered: Tensor | None) -> Tensor:
        n = grid.size("z")
        ctx.grid, ctx.numel = grid, piece.numel() * n
        flat = gathered if gathered is not None else start_depth_gather(piece, grid)[0]
        return _block(flat, shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _scatter_block_grad(g, ctx.grid, ctx.numel), None, None, None


def _block(flat: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The (y, x) block at the front of a gathered flat buffer (the tail is padding)."""
    return flat[:math.prod(shape)].view(shape)


def _scatter_block_grad(g: Tensor, grid: Grid, numel: int, dtype: torch.dtype | None = None) -> Tensor:
    """This z rank's piece of the block gradient summed over z, in ``dtype`` (default: ``g``'s);
    ``numel``: the padded flat size. A contiguous gradient of the right size and dtype is reduced
    as it is; otherwise one copy makes the flat buffer, casting on the way, and only the
    padding tail is zeroed."""
    n, dtype = grid.size("z"), dtype or g.dtype
    if g.numel() == numel and g.dtype == dtype and g.is_contiguous():
        flat = g.view(-1)
    else:
        flat = g.new_empty(numel, dtype=dtype)
        flat[:g.numel()].copy_(g.reshape(-1))
        flat[g.numel():].zero_()
    piece = flat.new_empty(numel // n)
    reduce_scatter_flat(piece, flat, group=grid.group("z"))
    COUNTER.add("reduce_scatter[z]", flat, n)
    return piece


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta, while a dry run traces)
        return None
    return torch.get_autocast_dtype(device.type) if enabled else None


def matmul_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a matmul with ``weight`` runs in here: autocast's, else the weight's own."""
    return _autocast_dtype(weight.device) or weight.dtype


class _Matmul(torch.autograd.Function):
    """``t @ w.T`` (``t @ w`` when ``transposed``) whose input gradient is all-reduced over
    ``axis`` while the weight gradient is computed, and whose partial sums are all-reduced over
    ``sum_axis``: in place, on the product this Function just made, so no copy is needed (a
    separate all-reduce Function must copy its input, see ``_AllReduce``)."""

    @staticmethod
    def forward(ctx, t: Tensor, w: Tensor, grid: Grid, axis: str | None, transposed: bool,
                sum_axis: str | None, chunks: int) -> Tensor:
        dtype = _autocast_dtype(t.device)
        if dtype is not None:
            # Cast as autocast casts a matmul, and save the cast operands: backward runs outside
            # autocast and must multiply tensors of one dtype. Autograd casts the returned
            # gradients back to the (fp32) dtypes of t and w.
            t, w = t.to(dtype), w.to(dtype)
        ctx.save_for_backward(t, w)
        ctx.grid, ctx.axis, ctx.transposed = grid, axis, transposed
        return _product(t, w if transposed else w.t(), grid, sum_axis, chunks)

    @staticmethod
    def backward(ctx, g: Tensor):
        t, w = ctx.saved_tensors
        gt, gw = _matmul_grads(ctx, g, t, w, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gt, gw, None, None, None, None, None


OVERLAP_MIN_ROWS = 64
"""Rows (tokens) a chunk of an overlapped product needs at least: below that, a chunk's matmul
is too short to hide an all-reduce behind and only adds a kernel launch."""


def overlap_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    """The row ranges a product of ``rows`` rows is split into: ``chunks`` near-equal ones, as
    many as keep ``OVERLAP_MIN_ROWS`` rows each (one range means no split)."""
    n = min(chunks, rows // OVERLAP_MIN_ROWS)
    if n <= 1:
        return [(0, rows)]
    step = -(-rows // n)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _product(t: Tensor, wt: Tensor, grid: Grid, sum_axis: str | None, chunks: int) -> Tensor:
    """``t @ wt``, all-reduced over ``sum_axis`` in place. Split into row chunks
    (``overlap_bounds``), each chunk's all-reduce is launched as soon as its rows are multiplied
    and runs while the next chunk multiplies (on NCCL's stream, or gloo's threads): only the
    last chunk's all-reduce is exposed, instead of the whole one. The chunks are slices of one
    output buffer, so nothing is copied. Fake and meta tensors (the pipeline's trace, a dry run) are
    never split: there is nothing to overlap."""
    # Not under torch.compile either: it cannot trace async collectives, and schedules its own.
    split = sum_axis is not None and chunks > 1 and not (torch.compiler.is_compiling() or stand_in(t))
    bounds = overlap_bounds(t.shape[:-1].numel(), chunks) if split else []
    if len(bounds) <= 1:
        out = t @ wt
        if sum_axis is not None:
            _all_reduce(out, grid, sum_axis)
        return out
    rows = t.reshape(-1, t.shape[-1])  # a view for the inputs layers get (contiguous or a feature slice)
    # Returned whole, not as a view: autograd forbids in-place ops (relu_, *=) on a view that a
    # custom Function returns, and the unsplit product allows them.
    out = t.new_empty((*t.shape[:-1], wt.shape[-1]))
    flat = out.view(-1, wt.shape[-1])
    works = []
    for a, b in bounds:
        torch.matmul(rows[a:b], wt, out=flat[a:b])
        works.append(_all_reduce(flat[a:b], grid, sum_axis, async_op=True))
    for work in works:
        work.wait()
    return out


def _matmul_grads(ctx: Any, g: Tensor, t: Tensor, w: Tensor, want_t: bool,
                  want_w: bool) -> tuple[Tensor | None, Tensor | None]:
    """The adjoint of ``t @ w.T`` (``t @ w``): dt all-reduced over ``ctx.axis`` while dw is
    computed."""
    gt = gw = work = None
    if want_t:
        gt = g @ w.t() if ctx.transposed else g @ w
        if ctx.axis is not None:
            # Traced by torch.compile (which cannot trace async collectives), it is a plain
            # all-reduce that the compiler itself may overlap with dw.
            work = _all_reduce(gt, ctx.grid, ctx.axis, async_op=not torch.compiler.is_compiling())
    if want_w:
        g2, t2 = g.reshape(-1, g.shape[-1]), t.reshape(-1, t.shape[-1])
        gw = t2.t() @ g2 if ctx.transposed else g2.t() @ t2
    if work is not None:
        work.wait()
    return gt, gw


class _DepthMatmul(torch.autograd.Function):
    """``t @ W.T`` (``t @ W``) where ``W`` is this rank's (y, x) block, all-gathered over z from
    its flat ``piece`` (or taken from a prefetched ``gathered`` buffer of the matmul's dtype).
    Saves ``piece`` and gathers again in backward unless ``keep``."""

    @staticmethod
    def forward(ctx, t: Tensor, piece: Tensor, grid: Grid, axis: str | None, transposed: bool,
                shape: tuple[int, ...], gathered: Tensor | None, keep: bool, sum_axis: str | None,
                chunks: int) -> Tensor:
        dtype = _autocast_dtype(t.device)
        if dtype is not None:
            t = t.to(dtype)
        flat = gathered if gathered is not None else start_depth_gather(piece, grid, dtype)[0]
        w = _block(flat, shape)
        ctx.save_for_backward(t, w if keep else piece)
        ctx.grid, ctx.axis, ctx.transposed, ctx.shape, ctx.dtype, ctx.keep = grid, axis, transposed, shape, dtype, keep
        ctx.numel, ctx.piece_dtype = flat.numel(), piece.dtype
        return _product(t, w if transposed else w.t(), grid, sum_axis, chunks)

    @staticmethod
    def backward(ctx, g: Tensor):
        t, saved = ctx.saved_tensors
        w = saved if ctx.keep else _block(start_depth_gather(saved, ctx.grid, ctx.dtype)[0], ctx.shape)
        gt, gw = _matmul_grads(ctx, g, t, w, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        piece_grad = None
        if gw is not None:
            # Reduced in the parameter's dtype (fp32 under bf16 autocast), as the unfused chain
            # reduced it after autograd's cast back.
            piece_grad = _scatter_block_grad(gw, ctx.grid, ctx.numel, ctx.piece_dtype)
        return gt, piece_grad, None, None, None, None, None, None, None, None


def drop_last(t: Tensor, grid: Grid, axis: str) -> Tensor:
    return _DropLast.apply(t, grid, axis) if grid.size(axis) > 1 else t


def gather_last(t: Tensor, grid: Grid, axis: str) -> Tensor:
    return _GatherLast.apply(t, grid, axis) if grid.size(axis) > 1 else t


def all_reduce(t: Tensor, grid: Grid, axis: str) -> Tensor:
    return _AllReduce.apply(t, grid, axis) if grid.size(axis) > 1 else t


def start_depth_gather(piece: Tensor, grid: Grid, dtype: torch.dtype | None = None,
                       async_op: bool = False) -> tuple[Tensor, Any]:
    """All-gather a depth piece (cast to ``dtype`` first, if given) into a new flat buffer; with
    ``async_op`` also the work handle."""
    n = grid.size("z")
    local = piece.detach().to(dtype or piece.dtype).contiguous()
    flat = local.new_empty(local.numel() * n)
    work = all_gather_flat(flat, local, group=grid.group("z"), async_op=async_op)
    COUNTER.add("all_gather[z]", flat, n)
    return flat, work


def depth_gather(piece: Tensor, grid: Grid, shape: tuple[int, ...], gathered: Tensor | None = None) -> Tensor:
    """``gathered``: the flat result of an earlier ``start_depth_gather`` (a prefetch)."""
    if grid.size("z") > 1:
        return _DepthGather.apply(piece, grid, shape, gathered)
    return piece.view(shape)


def _used(grid: Grid, axis: str | None) -> str | None:
    return axis if axis is not None and grid.size(axis) > 1 else None


def matmul(t: Tensor, w: Tensor, grid: Grid, reduce_axis: str, transposed: bool, sum_axis: str | None = None,
           chunks: int = 1) -> Tensor:
    """``reduce_axis``: the input gradient's all-reduce; ``sum_axis``: the output's, overlapped
    with the product in up to ``chunks`` row chunks (``_product``)."""
    return _Matmul.apply(t, w, grid, _used(grid, reduce_axis), transposed, _used(grid, sum_axis), chunks)


def depth_matmul(t: Tensor, piece: Tensor, grid: Grid, reduce_axis: str, transposed: bool,
                 shape: tuple[int, ...], gathered: Tensor | None = None, keep: bool = False,
                 sum_axis: str | None = None, chunks: int = 1) -> Tensor:
    """``matmul`` with the weight block all-gathered over z from ``piece`` (z > 1); ``gathered``
    a prefetched flat buffer in ``matmul_dtype(piece)``; ``keep`` saves the block for backward."""
    return _DepthMatmul.apply(t, piece, grid, _used(grid, reduce_axis), transposed, shape, gathered, keep,
                              _used(grid, sum_axis), chunks)
