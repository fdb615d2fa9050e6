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
activation. ``chain`` must be called after ``auto_parallelize`` and before ``autopar.parallelize``
(it replaces the consumer's weight tensor).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..runtime.params import set_grad_axes
from ..runtime.state import current_grid
from .layers import Embedding, Linear, ShardedModule, feature_axes, gather_full, make_local, spec_of
from .layout import ShardSpec, divisible


def chain(producers: Sequence[nn.Module], consumer: nn.Module) -> None:
    """Let ``producers`` pass their output feature blocks straight to ``consumer``.

    The caller guarantees that everything between them is per-feature; every rank must make the
    same call (the consumer's weight is re-laid out collectively)."""
    grid = current_grid()
    for layer in (*producers, consumer):
        if not isinstance(layer, ShardedModule) or isinstance(layer, Embedding) or spec_of(layer.weight) is None:
            raise ValueError(f"chain needs sharded Linear/Conv1D layers built under auto_parallelize; "
                             f"{layer!r} is not one (replicated or another type)")
    for layer in producers:
        if feature_axes(spec_of(layer.weight), not isinstance(layer, Linear))[0] != "y":
            raise ValueError(f"{layer!r} already feeds a chain in the swapped layout; chain it only once")
    if consumer.in_sharded:
        raise ValueError(f"{consumer!r} is already the consumer of a chain")
    spec = spec_of(consumer.weight)
    swapped = ShardSpec(spec.full_shape, spec.dim_axes[::-1], spec.depth, spec.sizes)
    if not divisible(swapped.full_shape, swapped.dim_axes, spec.axis_sizes):
        raise ValueError(f"{consumer!r}: weight {spec.full_shape} does not divide over {swapped.dim_axes} "
                         "in the swapped layout; leave this pair unchained")
    consumer._parameters["weight"] = make_local(gather_full(consumer.weight, spec, grid), swapped, grid,
                                                consumer.weight.requires_grad)
    consumer.in_sharded = True
    if consumer.bias is not None:
        set_grad_axes(consumer.bias, ("dp", "z", "x") if grid.size("x") > 1 else ("dp", "z"))
    for layer in producers:
        layer.out_sharded = True
