"""Which slice of a serial tensor each (x, y, z) rank holds: the one place that defines it.

A 2D weight of full shape ``(R, C)`` is laid out in two stages (AxoNN's 3D matmul):

1. **Block.** Each tensor dimension is cut evenly over one grid axis (``dim_axes``). For
   ``nn.Linear`` / ``nn.Embedding`` the weight is ``out x in`` (``vocab x dim``) and
   ``dim_axes = ("y", "x")``: rank (x, y) owns rows ``y*R/Y : (y+1)*R/Y`` and columns
   ``x*C/X : (x+1)*C/X``. Hugging Face ``Conv1D`` stores ``in x out``, so ``dim_axes = ("x", "y")``.
   A tied embedding / LM head therefore has one layout and can stay one tensor.
2. **Depth.** With ``depth=True`` the block is flattened (row-major), zero-padded to a multiple
   of Z and rank z keeps elements ``z*k : (z+1)*k`` with ``k = ceil(block_numel / Z)``. The local
   parameter is this 1D piece of ``k`` elements; forward all-gathers it over ``z``.

Layers in a ``chain`` (the sharded layout) may hold the swapped orientation, e.g. a Linear
with ``dim_axes = ("x", "y")``: always read ``dim_axes`` from the spec, never assume it.
A bias is cut like the output features of its layer in the default orientation: over y
(``bias_spec``), whatever a chain later does to the weight. LayerNorms, tied biases and every
layer left replicated are not sharded: each rank holds the full tensor (``spec_of(param) is
None``). A rank's coordinates on axes not in ``spec.axes`` (dp, pp, and x/y/z of size 1) do not
matter: those ranks hold identical copies.

``ShardSpec`` is plain data (picklable, no process groups) so checkpoint code can reshard
between grids with ``spec.shard(full, coords)`` / ``spec.assemble(pieces)`` instead of
re-deriving the layout. Every sharded parameter carries its spec as ``param._autopar_spec``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class ShardSpec:
    full_shape: tuple[int, ...]
    dim_axes: tuple[str | None, ...]  # grid axis cutting each dimension (None: not cut)
    depth: bool                       # flattened block split over z
    sizes: tuple[tuple[str, int], ...]  # the (x, y, z) sizes the layout was made for

    @property
    def axis_sizes(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def axes(self) -> tuple[str, ...]:
        """Grid axes the tensor is partitioned over, outermost first (its ``shard_axes``)."""
        used = {a for a in self.dim_axes if a} | ({"z"} if self.depth else set())
        return tuple(a for a in ("z", "y", "x") if a in used and self.axis_sizes[a] > 1)

    @property
    def block_shape(self) -> tuple[int, ...]:
        n = self.axis_sizes
        return tuple(d // n[a] if a else d for d, a in zip(self.full_shape, self.dim_axes))

    @property
    def block_numel(self) -> int:
        return math.prod(self.block_shape)

    @property
    def local_numel(self) -> int:
        """Elements of the local piece (the depth piece is padded, so equal on every z rank)."""
        return -(-self.block_numel // self.axis_sizes["z"]) if self.depth else self.block_numel

    @property
    def local_shape(self) -> tuple[int, ...]:
        return (self.local_numel,) if self.depth else self.block_shape

    def block_slices(self, coords: Mapping[str, int]) -> tuple[slice, ...]:
        return tuple(slice(coords[a] * b, (coords[a] + 1) * b) if a else slice(None)
                     for b, a in zip(self.block_shape, self.dim_axes))

    def shard(self, full: torch.Tensor, coords: Mapping[str, int]) -> torch.Tensor:
        """The local piece of ``full`` for the rank at ``coords`` (a fresh contiguous tensor)."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(f"expected a tensor of the full shape {self.full_shape}, got {tuple(full.shape)}")
        block = full[self.block_slices(coords)]
        if not self.depth:
            return block.contiguous().clone()
        k = self.local_numel
        flat = block.reshape(-1)
        start, stop = coords["z"] * k, min((coords["z"] + 1) * k, flat.numel())
        piece = flat.new_zeros(k)
        if stop > start:
            piece[:stop - start] = flat[start:stop]
        return piece

    def assemble(self, pieces: torch.Tensor) -> torch.Tensor:
        """Inverse of ``shard``: ``pieces[i]`` is the local piece of the rank at position ``i`` of
        ``group(*self.axes)`` (the (z, y, x) mixed-radix order an all-gather returns)."""
        n = self.axis_sizes
        depth = n["z"] if "z" in self.axes else 1
        blocks = [a for a in ("y", "x") if a in self.axes]
        pieces = pieces.reshape(depth, -1, self.local_numel)
        full = pieces.new_empty(self.full_shape)
        for j in range(pieces.shape[1]):
            coords, rest = {"x": 0, "y": 0, "z": 0}, j
            for a in reversed(blocks):
                coords[a], rest = rest % n[a], rest // n[a]
            flat = pieces[:, j].reshape(-1)[:self.block_numel]
            full[self.block_slices(coords)] = flat.view(self.block_shape)
        return full


def linear_weight_spec(full_shape: tuple[int, int], sizes: Mapping[str, int], transposed: bool = False) -> ShardSpec:
    """``out x in`` weight (or ``in x out`` when ``transposed``, for HF ``Conv1D``)."""
    return ShardSpec(tuple(full_shape), ("x", "y") if transposed else ("y", "x"), True, _sizes(sizes))


def bias_spec(out_features: int, sizes: Mapping[str, int]) -> ShardSpec:
    """A layer's bias, cut over y like its output features."""
    return ShardSpec((out_features,), ("y",), False, _sizes(sizes))


def _sizes(sizes: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple((a, sizes[a]) for a in ("x", "y", "z"))


def divisible(full_shape: tuple[int, ...], dim_axes: tuple[str | None, ...], sizes: Mapping[str, int]) -> bool:
    return all(a is None or d % sizes[a] == 0 for d, a in zip(full_shape, dim_axes))
