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

Re-laying out a weight rewrites the values of its local piece *in place*: the piece keeps its
shape, its ``shard_axes`` and its ``grad_axes``, and the bias keeps its y layout and its tags
(``layers.linear_3d`` adds it so that its gradient needs the same reduction in every
orientation). So ``chain`` may run before or after ``autopar.parallelize`` (the automatic
detection in ``autochain`` runs it at the first forward, after the optimizer exists), as long as
no optimizer step has happened yet. Anything that copied the weights elsewhere (host master
weights of an offloaded step) must refresh its copy afterwards; the engine does so after its
first forward (``Engine.layout_final``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..runtime.params import set_shard_axes
from .layers import Embedding, Linear, ShardedModule, feature_axes, gather_full, spec_of
from .layout import ShardSpec, divisible


def _out_axis(layer: ShardedModule) -> str:
    return feature_axes(spec_of(layer.weight), not isinstance(layer, Linear))[0]


def _swapped(layer: ShardedModule) -> ShardSpec:
    spec = spec_of(layer.weight)
    return ShardSpec(spec.full_shape, spec.dim_axes[::-1], spec.depth, spec.sizes)


def handoff_axis(layer: ShardedModule) -> str:
    """The axis feature blocks are handed over along on ``layer``'s grid: y, or x when y has
    size 1."""
    return "y" if layer.autopar_grid.size("y") > 1 else "x"


def chain_problem(producers: Sequence[nn.Module], consumer: nn.Module) -> str | None:
    """Why ``chain(producers, consumer)`` cannot be done, or None; changes nothing."""
    layers = (*producers, consumer)
    for layer in layers:
        if not isinstance(layer, ShardedModule) or isinstance(layer, Embedding) or spec_of(layer.weight) is None:
            return (f"chain needs sharded Linear/Conv1D layers built under auto_parallelize; "
                    f"{layer!r} is not one (replicated or another type)")
    if consumer.in_sharded:
        return f"{consumer!r} is already the consumer of a chain"
    if any(layer.autopar_grid is not consumer.autopar_grid for layer in producers):
        return f"{consumer!r} and its producers are sharded on different grids"
    handoff = handoff_axis(consumer)
    other = "x" if handoff == "y" else "y"
    targets = [(layer, handoff) for layer in producers] + [(consumer, other)]
    for layer, out_axis in targets:
        if _out_axis(layer) == out_axis:
            continue
        if layer.in_sharded or layer.out_sharded:
            return (f"{layer!r} is already in a chain with the other orientation; a layer can be "
                    "a consumer and a producer only when one of x, y has size 1")
        swapped = _swapped(layer)
        if not divisible(swapped.full_shape, swapped.dim_axes, swapped.axis_sizes):
            return (f"{layer!r}: weight {swapped.full_shape} does not divide over {swapped.dim_axes} "
                    "in the swapped layout; leave this pair unchained")
    return None


def _orient(layer: ShardedModule, out_axis: str) -> None:
    """Re-lay ``layer``'s weight in place so its output features are cut over ``out_axis``."""
    if _out_axis(layer) == out_axis:
        return
    spec, swapped, grid = spec_of(layer.weight), _swapped(layer), layer.autopar_grid
    weight = layer.weight
    with torch.no_grad():
        weight.copy_(swapped.shard(gather_full(weight, spec, grid), grid.coords))
    weight._autopar_spec = swapped
    set_shard_axes(weight, swapped.axes)  # the same axes: only which block each rank holds moves


def chain(producers: Sequence[nn.Module], consumer: nn.Module) -> None:
    """Let ``producers`` pass their output feature blocks straight to ``consumer``.

    The blocks are handed over along y, or along x when y has size 1 (then the producers are the
    ones re-laid out: Megatron's column- then row-parallel pair). The caller guarantees that
    everything between them is per-feature; every rank must make the same call (weights are
    re-laid out collectively). Call it before the first optimizer step."""
    problem = chain_problem(producers, consumer)
    if problem is not None:
        raise ValueError(problem)
    handoff = handoff_axis(consumer)
    other = "x" if handoff == "y" else "y"
    for layer in producers:
        _orient(layer, handoff)
    _orient(consumer, other)
    consumer.in_sharded = True
    for layer in producers:
        layer.out_sharded = True
