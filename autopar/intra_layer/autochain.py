"""Automatic sharded layout: find chained layers at the first forward and ``chain`` them.

``auto_parallelize`` hands its sharded ``Linear`` / ``Conv1D`` layers to ``watch``. The first
time a module containing one of them is called (the model's first forward, usually inside
``Engine.step``), that call is observed, then replayed:

1. *observe*: the module's forward runs under ``torch.no_grad`` with ``flow.Flow`` active, which
   records which layers reach which through per-feature ops only (see ``flow`` for what is
   proven safe). The RNG state and the module's buffers are saved first and the depth
   prefetcher is paused, so the observation leaves no trace;
2. *agree*: every rank keeps only the chains that all ranks found, so layouts never diverge;
3. *chain*: the weights of the chosen pairs are re-laid out in place (``chain``);
4. *replay*: the global forward hook returns the result of calling the module again, which is
   the forward autograd sees. The first step so costs one extra forward without autograd.

Why observe and replay instead of recording the real forward: the producer's layout must be
fixed before it runs, but whether its output is used elsewhere (a residual after the consumer)
is only known at the end of the forward. Why at the first forward and not when the block
exits: there is no input then. It is after ``autopar.parallelize``, which is fine because a
re-layout keeps every parameter's shape and tags (see ``chain``) and no optimizer step has run.

Assumptions, as for the prefetch order: every forward has the data flow of the first one.
A model whose forward mutates Python state sees that extra forward. Not done with ``pp > 1``
(the pipeline traces and splits the model at its first step) nor when x and y have size 1.
The ``auto_parallelize(chain=False)`` keyword turns it off; ``chain`` still works by hand.

Copies of the weights made before the first forward keep the old layout: the host master
weights of ``offload="optimizer+step"`` and optimizer state loaded by ``load_checkpoint``. The
engine therefore asks ``layout_pending`` and, while it is true, refreshes the masters and
defers per-parameter state loads until its first forward is done (``Engine.layout_final``).
"""
from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..runtime.grid import Grid
from ..runtime.state import current_grid
from .chain import chain, chain_problem
from .flow import Flow
from .layers import ShardedModule

log = logging.getLogger("autopar")


class _Watch:
    """The layers of one ``auto_parallelize`` block waiting for their first forward."""

    def __init__(self, layers: list[ShardedModule], grid: Grid) -> None:
        self.layers = [weakref.ref(layer) for layer in layers]
        self.ids = {id(layer) for layer in layers}
        # Weak: a model built but never run (its watch waits for a forward that may not come)
        # must not keep the grid's process groups, and their gloo threads, alive past destroy().
        self._grid = weakref.ref(grid)
        self.seen: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

    @property
    def grid(self) -> Grid | None:
        return self._grid()

    def alive(self) -> list[ShardedModule]:
        return [layer for ref in self.layers if (layer := ref()) is not None]

    def any_alive(self) -> bool:
        return any(ref() is not None for ref in self.layers)  # stops at the first: cheap per call

    def contains(self, module: nn.Module) -> bool:
        if module not in self.seen:
            self.seen[module] = any(id(m) in self.ids for m in module.modules())
        return self.seen[module]


class _Observation:
    """State of one observed forward, from the root's pre-hook to its post-hook."""

    def __init__(self, watch: _Watch, root: nn.Module) -> None:
        self.watch, self.root = watch, root
        self.layers = [layer for layer in watch.alive() if not (layer.in_sharded or layer.out_sharded)]
        self.flow = Flow(self.layers)
        self.order: list[nn.Module] = []
        device = watch.grid.device
        self.cuda = device if torch.device(device).type == "cuda" else None
        self.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(self.cuda) if self.cuda else None)
        self.buffers = [(m, name, b, b.detach().clone()) for m in root.modules()
                        for name, b in m._buffers.items() if b is not None]
        self.prefetchers = {layer: layer.prefetcher for layer in self.layers}
        for layer in self.layers:
            layer.prefetcher = None  # the replay is the forward the prefetcher should record
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.flow.__enter__()

    def close(self) -> None:
        """Leave no trace of the observation (also after an exception in the forward)."""
        self.flow.__exit__(None, None, None)
        self.no_grad.__exit__(None, None, None)
        for layer, prefetcher in self.prefetchers.items():
            layer.prefetcher = prefetcher
        torch.set_rng_state(self.rng[0])
        if self.cuda:
            torch.cuda.set_rng_state(self.rng[1], self.cuda)
        with torch.no_grad():
            for module, name, buffer, saved in self.buffers:
                module._buffers[name] = buffer
                buffer.copy_(saved)

    def decide(self, output: Any) -> list[tuple[list[nn.Module], nn.Module]]:
        self.flow.returned(output)
        found = [(p, c) for p, c in self.flow.chains(self.order) if chain_problem(p, c) is None]
        # Identical on every rank unless the forward branched on data: keep what all agree on.
        index = {id(layer): i for i, layer in enumerate(self.layers)}
        mine = [(tuple(index[id(p)] for p in ps), index[id(c)]) for ps, c in found]
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        agreed = set.intersection(*(set(map(tuple, e)) for e in everyone))
        return [(ps, c) for (ps, c), key in zip(found, mine) if key in agreed]


_lock = threading.Lock()
_watches: list[_Watch] = []
_handles: list[RemovableHandle] = []
_active: _Observation | None = None


def watch(layers: list[ShardedModule]) -> None:
    """Chain ``layers`` automatically at the first forward of a module that holds them."""
    grid = current_grid()
    if grid.sizes["pp"] > 1 or grid.size("x", "y") == 1 or len(layers) < 2:
        return
    with _lock:
        _watches.append(_Watch(layers, grid))
        if not _handles:
            _handles.append(nn.modules.module.register_module_forward_pre_hook(_pre))
            _handles.append(nn.modules.module.register_module_forward_hook(_post, with_kwargs=True,
                                                                            always_call=True))


def layout_pending(module: nn.Module) -> bool:
    """Whether the first forward of ``module`` may still re-lay out some of its layers."""
    with _lock:
        return any(w.any_alive() and w.contains(module) for w in _watches)


def _unwatch(watch: _Watch | None = None) -> None:
    with _lock:
        _watches[:] = [w for w in _watches if w is not watch and w.any_alive()]
        if not _watches:
            for handle in _handles:
                handle.remove()
            _handles.clear()


def _pre(module: nn.Module, args: tuple) -> None:
    global _active
    if _active is not None:
        if _active.root is not module and id(module) in _active.flow.watched:
            _active.order.append(module)
            _active.flow.enter_layer(module, args)
        return
    for w in list(_watches):
        if not w.any_alive() or w.grid is None or w.grid is not _current_or_none():
            _unwatch(w)  # its model is gone, or it was built on a grid that no longer exists
        elif w.contains(module):
            _active = _Observation(w, module)
            return


def _current_or_none() -> Grid | None:
    try:
        return current_grid()
    except RuntimeError:
        return None


def _post(module: nn.Module, args: tuple, *rest: Any) -> Any:
    """``rest`` is (kwargs, output), or (output,) when the forward raised."""
    global _active
    obs = _active
    if obs is None:
        return None
    if obs.root is not module:
        if id(module) in obs.flow.watched:
            obs.flow.exit_layer(module, rest[0] if len(rest) == 2 else {}, rest[-1])
        return None
    _active = None
    obs.close()
    if len(rest) != 2:  # the forward raised: observe again at the next call
        return None
    kwargs, output = rest
    try:
        chains = obs.decide(output)
    finally:
        _unwatch(obs.watch)
    for producers, consumer in chains:
        chain(producers, consumer)
    if chains and obs.watch.grid.rank == 0:
        names = {id(m): n or type(m).__name__ for n, m in module.named_modules()}
        pairs = [f"{' + '.join(names[id(p)] for p in ps)} -> {names[id(c)]}" for ps, c in chains]
        log.info("auto_parallelize: %d chain(s) hand over feature blocks (sharded layout):\n  %s",
                 len(chains), "\n  ".join(pairs))
    # The real forward, in the new layout. ``args`` already went through the module's own
    # pre-hooks, and its post-hooks run on what this returns, as for the original call.
    return module.forward(*args, **kwargs)
