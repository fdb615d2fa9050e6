"""Which elements of a full serial tensor a local tensor holds, in a grid-independent form.

Every layout autopar produces is a *region*: a box of the full tensor (a start/stop per
dimension) and, of that box flattened row-major, the elements ``lo:hi``. A replicated tensor is
the whole box with the whole range; a tensor-parallel block is a smaller box; a depth piece is
a flat range of its block (its zero padding lies past ``hi`` and is never stored); a ZeRO shard
of optimizer state is a sub-range of that. Because the description does not mention the grid,
a piece saved under one grid can be intersected with the piece a rank needs under any other.

The layout itself comes from the parameter's ``_autopar_spec`` (its ``block_slices``,
``block_numel`` and ``local_numel``; depth rank ``z`` keeps ``z*k : (z+1)*k`` of the block, as
``intra_layer.layout`` defines); this module only knows that duck-typed protocol.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

ROWS_NUMEL = 1 << 22
"""Elements of the index arithmetic done at once while filling: bounds the transient memory of
``fill`` (two int64 index tensors of this size) whatever the tensor's size."""

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Region:
    box: Box
    lo: int
    hi: int

    @property
    def box_shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.box)

    @property
    def numel(self) -> int:
        return max(self.hi - self.lo, 0)

    def sub(self, start: int, stop: int) -> Region:
        """The region of the local flat elements ``start:stop`` (padding past ``hi`` dropped)."""
        return Region(self.box, min(self.lo + start, self.hi), min(self.lo + stop, self.hi))

    def to_json(self) -> list:
        return [[list(d) for d in self.box], self.lo, self.hi]

    @classmethod
    def from_json(cls, data: list) -> Region:
        box, lo, hi = data
        return cls(tuple((int(a), int(b)) for a, b in box), int(lo), int(hi))


def full_region(shape: tuple[int, ...]) -> Region:
    return Region(tuple((0, d) for d in shape), 0, math.prod(shape))


def spec_of(tensor: torch.Tensor) -> object | None:
    return getattr(tensor, "_autopar_spec", None)


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    spec = spec_of(tensor)
    return tuple(spec.full_shape) if spec is not None else tuple(tensor.shape)


def region_of(tensor: torch.Tensor, coords: Mapping[str, int]) -> Region:
    """The part of the full tensor that ``tensor`` (this rank's copy) holds."""
    spec = spec_of(tensor)
    if spec is None:
        return full_region(tuple(tensor.shape))
    box = tuple((s.start or 0, d if s.stop is None else s.stop)
                for s, d in zip(spec.block_slices(coords), spec.full_shape))
    lo = coords["z"] * spec.local_numel if spec.depth else 0
    return Region(box, lo, min(lo + spec.local_numel, spec.block_numel))


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(s < e for s, e in out) else None


def overlaps(target: Region, piece: Region) -> bool:
    """Whether the boxes share elements (a cheap superset of what ``fill`` copies)."""
    return not target.box or _intersect(target.box, piece.box) is not None


def _flat_index(sub: Box, box: Box) -> torch.Tensor:
    """Row-major flat index inside ``box`` of every element of ``sub`` (shape of ``sub``)."""
    idx = torch.zeros((), dtype=torch.int64)
    stride = 1
    for d in reversed(range(len(box))):
        r = torch.arange(sub[d][0] - box[d][0], sub[d][1] - box[d][0], dtype=torch.int64) * stride
        idx = idx + r.view((-1,) + (1,) * (len(box) - 1 - d))
        stride *= box[d][1] - box[d][0]
    return idx


Reader = Callable[[int, int], torch.Tensor]
"""``read(start, stop)``: elements ``start:stop`` of a stored 1D piece."""


def fill(out: torch.Tensor, target: Region, piece: Region, read: Reader) -> int:
    """Copy the elements that ``piece`` (stored flat, read through ``read``) shares with
    ``target`` into ``out`` (1D, element ``i`` is ``target``'s flat element ``lo + i``).
    Returns how many elements were copied. Reads only the stored range each row block needs."""
    if not target.box:  # a 0-d tensor (AdamW's ``step``)
        if target.numel and piece.numel:
            out[0] = read(0, 1)[0]
            return 1
        return 0
    inter = _intersect(target.box, piece.box)
    if inter is None:
        return 0
    row = math.prod(e - s for s, e in inter[1:])
    step = max(1, ROWS_NUMEL // max(row, 1))
    copied = 0
    for r0 in range(inter[0][0], inter[0][1], step):
        sub = ((r0, min(r0 + step, inter[0][1])),) + inter[1:]
        it, ip = _flat_index(sub, target.box).reshape(-1), _flat_index(sub, piece.box).reshape(-1)
        keep = (it >= target.lo) & (it < target.hi) & (ip >= piece.lo) & (ip < piece.hi)
        if not bool(keep.any()):
            continue
        it, ip = it[keep] - target.lo, ip[keep] - piece.lo
        start = int(ip.min())
        data = read(start, int(ip.max()) + 1)
        out[it] = data[ip - start].to(out.dtype)
        copied += it.numel()
    return copied
