"""The sharded layout: consecutive layers that hand over feature blocks instead of full features.

By default every parallel layer all-gathers its output over y, and the next one slices its
input over x again. When a layer's output only reaches the next layer through per-feature
(elementwise) ops, for example ``down(gelu(up(h)))``, ``down(silu(gate(h)) * up(h))`` or
attention ``o(attn(q(h), k(h), v(h)))`` whose heads split evenly, the gather and the slice cancel
out: the producers keep their output block (features cut over y) and the consumer takes it as
its input block. For that the consumer's weight swaps roles (AxoNN's ``transpose``): its input
features are cut over y and its output features over x, so its weight ``out x in`` has
``dim_axes = ("x", "y")``. It then all-reduces its partial output over y, gathers it over x,
and its input gradient is all-reduced over x, which is exactly what the producers need.

Per pair this saves the forward all-gather over y and the backward all-gather over x of one
activation. When y has size 1 the hand-off goes along x instead and it is the producers that
swap roles (Megatron's column-parallel layer feeding a row-parallel one).

``chain`` must be called after ``auto_parallelize`` and before ``autopar.parallelize``: it
replaces the re-laid-out weight tensors. Nothing detects chains automatically yet.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..runtime.params import set_grad_axes
from ..runtime.state import current_grid
from .layers import Embedding, Linear, ShardedModule, feature_axes, gather_full, make_local, spec_of
from .layout import ShardSpec, divisible


def _orient(layer: ShardedModule, out_axis: str) -> None:
    """Re-lay ``layer``'s weight so its output features are cut over ``out_axis``."""
    spec = spec_of(layer.weight)
    if feature_axes(spec, not isinstance(layer, Linear))[0] == out_axis:
        return
    if layer.in_sharded or layer.out_sharded:
        raise ValueError(f"{layer!r} is already in a chain with the other orientation; a layer can be "
                         "a consumer and a producer only when one of x, y has size 1")
    swapped = ShardSpec(spec.full_shape, spec.dim_axes[::-1], spec.depth, spec.sizes)
    if not divisible(swapped.full_shape, swapped.dim_axes, spec.axis_sizes):
        raise ValueError(f"{layer!r}: weight {spec.full_shape} does not divide over {swapped.dim_axes} "
                         "in the swapped layout; leave this pair unchained")
    grid = current_grid()
    layer._parameters["weight"] = make_local(gather_full(layer.weight, spec, grid), swapped, grid,
                                             layer.weight.requires_grad)
    if layer.bias is not None:
        set_grad_axes(layer.bias, ("dp", "z", out_axis) if grid.size(out_axis) > 1 else ("dp", "z"))


def chain(producers: Sequence[nn.Module], consumer: nn.Module) -> None:
    """Let ``producers`` pass their output feature blocks straight to ``consumer``.

    The blocks are handed over along y, or along x when y has size 1 (then the producers are the
    ones re-laid out: Megatron's column- then row-parallel pair). The caller guarantees that
    everything between them is per-feature; every rank must make the same call (weights are
    re-laid out collectively)."""
    grid = current_grid()
    for layer in (*producers, consumer):
        if not isinstance(layer, ShardedModule) or isinstance(layer, Embedding) or spec_of(layer.weight) is None:
            raise ValueError(f"chain needs sharded Linear/Conv1D layers built under auto_parallelize; "
                             f"{layer!r} is not one (replicated or another type)")
    if consumer.in_sharded:
        raise ValueError(f"{consumer!r} is already the consumer of a chain")
    handoff = "y" if grid.size("y") > 1 else "x"
    other = "x" if handoff == "y" else "y"
    for layer in producers:
        _orient(layer, handoff)
    _orient(consumer, other)
    consumer.in_sharded = True
    for layer in producers:
        layer.out_sharded = True
