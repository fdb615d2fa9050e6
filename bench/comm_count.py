"""Bytes each rank sends, counted by wrapping the ``torch.distributed`` calls (shared by the bench scripts).

Why wrap the calls instead of reading ``autopar.intra_layer.comm.COUNTER``: that counter sees the
tensor-parallel layers only, while the benchmarks need every byte of a step (pipeline p2p,
gradient buckets, ZeRO gathers, clipping, the loss) in one place, attributed to the process
group it went over. The volumes are those of ring algorithms, the usual yardstick:

* all-reduce of n bytes over p ranks: 2(p-1)/p * n;
* all-gather / reduce-scatter (the full-size tensor is n bytes), all-to-all: (p-1)/p * n;
* broadcast: n (every rank forwards the message about once in a pipelined ring);
* send / isend: the message bytes (receives are not counted: bytes are counted once, at the sender).

Modules that bound a collective under another name at import time (``comm.all_gather_flat``)
would bypass a patch of ``torch.distributed`` alone, so every ``autopar`` module attribute that
*is* one of the wrapped functions is patched too. Deprecated names that call the new ones
(``all_gather_into_tensor`` -> ``all_gather_single``) are counted once, at the outermost call.
"""
from __future__ import annotations

import inspect
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch.distributed as dist

# name -> (argument holding the tensor whose size sets the volume, factor as a function of p)
RULES: dict[str, tuple[str, Callable[[int], float]]] = {
    "all_reduce": ("tensor", lambda p: 2 * (p - 1) / p),
    "all_gather_single": ("output_tensor", lambda p: (p - 1) / p),
    "all_gather_into_tensor": ("output_tensor", lambda p: (p - 1) / p),
    "reduce_scatter_single": ("input", lambda p: (p - 1) / p),
    "reduce_scatter_tensor": ("input", lambda p: (p - 1) / p),
    "all_to_all_single": ("input", lambda p: (p - 1) / p),
    "broadcast": ("tensor", lambda p: 1.0 if p > 1 else 0.0),
    "isend": ("tensor", lambda p: 1.0),
    "send": ("tensor", lambda p: 1.0),
}


class ByteCounter:
    """``with ByteCounter() as c:`` counts what this rank sends. ``c.sent`` is the total;
    ``c.by_group[id(group)]`` the bytes per process group (``c.groups`` maps the id back to the
    group; None is the default group); ``c.by_tag`` the bytes sent inside ``with c.tag(name):``."""

    def __init__(self, names: tuple[str, ...] | None = None) -> None:
        self.names = tuple(n for n in (names or RULES) if hasattr(dist, n))
        self.sent = 0.0
        self.by_group: dict[int, float] = {}
        self.groups: dict[int, Any] = {}
        self.by_tag: dict[str, float] = {}
        self._real = {name: getattr(dist, name) for name in self.names}
        self._sigs = {name: inspect.signature(fn) for name, fn in self._real.items()}
        self._local = threading.local()
        self._tag: str | None = None
        self._patched: list[tuple[Any, str, Any]] = []

    def add(self, nbytes: float, group: Any = None) -> None:
        self.sent += nbytes
        self.by_group[id(group)] = self.by_group.get(id(group), 0.0) + nbytes
        self.groups[id(group)] = group
        if self._tag is not None:
            self.by_tag[self._tag] = self.by_tag.get(self._tag, 0.0) + nbytes

    @contextmanager
    def tag(self, name: str) -> Iterator[None]:
        outer, self._tag = self._tag, name
        try:
            yield
        finally:
            self._tag = outer

    def _counted(self, name: str) -> Callable:
        real, sig, (arg, factor) = self._real[name], self._sigs[name], RULES[name]

        def call(*a: Any, **kw: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                bound = sig.bind(*a, **kw)
                group = bound.arguments.get("group")
                t = bound.arguments[arg]
                self.add(factor(dist.get_world_size(group)) * t.numel() * t.element_size(), group)
            self._local.depth = depth + 1
            try:
                return real(*a, **kw)
            finally:
                self._local.depth = depth
        return call

    def __enter__(self) -> "ByteCounter":
        wrapped = {id(self._real[n]): self._counted(n) for n in self.names}
        # c10d too: P2POp checks its op against c10d's own isend/irecv (and autopar's recorder
        # may have wrapped those), so both namespaces must hand out the same counted function.
        modules = [dist, dist.distributed_c10d] + [m for k, m in list(sys.modules.items())
                                                   if k.startswith("autopar") and m is not None]
        for module in modules:
            for attr, value in list(vars(module).items()):
                if id(value) in wrapped and any(value is r for r in self._real.values()):
                    self._patched.append((module, attr, value))
                    setattr(module, attr, wrapped[id(value)])
        return self

    def __exit__(self, *exc: object) -> None:
        for module, attr, value in reversed(self._patched):
            setattr(module, attr, value)
        self._patched.clear()
