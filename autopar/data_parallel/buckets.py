"""Gradient buckets whose reduction overlaps backward.

Why buckets: one collective per parameter pays the latency of hundreds of small messages; one
collective after backward leaves the network idle during backward and the compute idle during
the reduction. A bucket is a flat, contiguous buffer of ~``bucket_mb`` MiB holding the gradients
of a run of parameters; each parameter's ``.grad`` is a *view* into it, so autograd accumulates
straight into the buffer (no flatten / unflatten copies) and the bucket is reduced in place.

Order: the first step packs parameters in reverse registration order, a cheap stand-in for the
order in which backward produces their gradients (the last layer's is ready first). Hooks record
the real order during that step, and after its reduction the buckets are re-planned in it once
(the first rank's order wins, so every rank has the same layout). Buckets are sorted by when
their last gradient is expected. A post-accumulate-grad hook counts the gradients that have
arrived; when a bucket is complete its asynchronous collective starts at once, while backward
goes on with earlier layers. Buckets are launched strictly in that one order on every rank, even
if gradients arrive in another order, because collectives on a group must be issued in the same
order everywhere.

Which ranks: a parameter's gradient is summed over its ``grad_axes`` (``runtime.params``), so
buckets never mix parameters with different axes (nor dtypes / devices); each bucket reduces over
its own process group. Parameters whose axes span one rank are not bucketed at all.

Accumulation (``no_sync`` semantics): while ``sync`` is False (every microbatch but the last) or
inside ``no_sync()``, the hooks only note that a gradient arrived; gradients accumulate locally in
the buckets, and only the last backward of a step launches collectives.

Unused parameters: on the first step one tiny all-reduce per bucket (and a host sync, once) finds
parameters that got no gradient on *any* rank; like in a serial run their ``.grad`` is ``None``
after every reduction, so the optimizer skips them. The set is assumed static afterwards (a
parameter that stops being used on some ranks simply contributes zeros, which is still the serial
sum); a parameter found unused that later produces a gradient raises instead of silently
diverging the replicas.

Reduced last: parameters listed in ``reduce_last`` (weights tied across pipeline stages, whose
gradient must first be summed over those stages) go into buckets of their own at the end of the
order, launched by ``finish()`` only.

ZeRO (``zero=1`` / ``zero=2``) keeps this layout and shards the optimizer over each bucket's
group; see ``zero.py``. Under ``zero=2`` a bucket's flat buffer only exists while it is reduced:
autograd accumulates into ordinary ``.grad`` tensors, a complete bucket copies them into a fresh
buffer (freeing them) and reduce-scatters it, and at most ``ZERO2_IN_FLIGHT`` buffers are alive
at once (launching one more first waits for the oldest and frees it). So gradient memory after
the last backward is the 1/n shards, not the full gradients.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.grid import Grid
from ..runtime.params import grad_axes
from .comm import all_reduce_grads, reduce_scatter_grads
from .layout import Bucket, plan_buckets
from .zero import check_elementwise, gather_params, shard_buckets

ZERO_STAGES = (0, 1, 2)
ZERO2_IN_FLIGHT = 2


def check_options(bucket_mb: float, zero: int) -> None:
    if zero not in ZERO_STAGES or isinstance(zero, bool):
        raise ValueError(f"zero must be one of {ZERO_STAGES}, got {zero!r}")
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be a positive number of MiB, got {bucket_mb!r}")


def _on_grad(buckets: "weakref.ref[GradBuckets]", p: nn.Parameter) -> None:
    live = buckets()
    if live is not None:
        live._on_grad(p)


class GradBuckets:
    """Bucketed, backward-overlapped gradient reduction for one rank's parameters.

    The engine's protocol per step: set ``sync`` before each backward (True only for the last
    microbatch), call ``finish()`` after the last backward and before clipping / the optimizer,
    and ``after_step()`` after the optimizer step (instead of ``optimizer.zero_grad``).
    """

    def __init__(self, params: Sequence[nn.Parameter], grid: Grid, *, bucket_mb: float, zero: int,
                 reduce_last: Sequence[nn.Parameter] = ()) -> None:
        check_options(bucket_mb, zero)
        self.grid = grid
        self.zero = zero
        self.params = list(params)
        self.sync = True
        self._no_sync_depth = 0
        self._next = 0
        self._in_flight: list[Bucket] = []  # zero=2: launched, buffer not yet freed
        self._unused: list[nn.Parameter] | None = None
        self._cap = int(bucket_mb * 2**20)
        self._last = {id(p) for p in reduce_last}
        self.reduced = [p for p in params if grad_axes(p) and grid.size(*grad_axes(p)) > 1]
        ids = {id(p) for p in self.reduced}
        self.local_params = [p for p in params if id(p) not in ids]
        self._where: dict[int, tuple[Bucket, int]] = {}
        # Gradients from before the buckets existed (a pipeline builds its stages during the first
        # step's backward) are reduced by the first finish(); the order is learnt in the next step.
        early = any(p.grad is not None for p in self.reduced)
        # ZeRO fixes the layout (the optimizer owns flat slices of it), so it is never rebuilt.
        self._rebuild_in = None if zero else (2 if early else 1)
        self._arrival: list[nn.Parameter] = []
        order = self.reduced[::-1]
        self.buckets = self._make_buckets(plan_buckets(order, zero, self._cap, self._last))
        # Weakly: a parameter's hooks are owned by its C++ tensor, which gc cannot see through
        # while anything else in C++ shares it, so a strong hook kept these buckets, and through
        # them every process group of their grid, alive after the engine and the grid were gone.
        me = weakref.ref(self)
        for p in self.reduced:
            p.register_post_accumulate_grad_hook(functools.partial(_on_grad, me))
        if zero:
            shard_buckets(self.buckets, zero)

    def _make_buckets(self, plan: list[list[nn.Parameter]]) -> list[Bucket]:
        """Flat buffers for ``plan``; a gradient already present is copied into its view."""
        buckets = []
        for ps in plan:
            axes = grad_axes(ps[0])
            world = self.grid.size(*axes)
            offsets, total = [], 0
            for p in ps:
                offsets.append(total)
                total += p.numel()
            bucket = Bucket(params=ps, offsets=offsets, numel=-(-total // world) * world, axes=axes,
                            group=self.grid.group(*axes), world=world, rank=self.grid.index(*axes))
            bucket.reset()
            earlier = [p.grad for p in ps]
            bucket.allocate_grad()
            for slot, (p, g) in enumerate(zip(ps, earlier)):
                self._where[id(p)] = (bucket, slot)
                if g is not None:
                    p.grad.copy_(g)
                    bucket.seen[slot] = True
            buckets.append(bucket)
        return buckets

    def _rebuild(self) -> None:
        """Re-plan the buckets in the order gradients really arrived in this step (hooks record
        it), e.g. when modules are registered in another order than they run. Ranks must agree
        on one layout, so the order of the first rank of this stage's replicas and shards wins;
        the reduced gradients move into the new buffers once."""
        seen = {id(p) for p in self._arrival}
        local = self._arrival + [p for p in self.reduced[::-1] if id(p) not in seen]
        index = {id(p): i for i, p in enumerate(self.reduced)}
        order = torch.tensor([index[id(p)] for p in local], dtype=torch.int64, device=self.grid.device)
        stage = ("dp", "z", "y", "x")
        if self.grid.size(*stage) > 1:
            dist.broadcast(order, group=self.grid.group(*stage), group_src=0)
        plan = plan_buckets([self.reduced[i] for i in order.tolist()], self.zero, self._cap, self._last)
        self._arrival = []
        if [[id(p) for p in ps] for ps in plan] != [[id(p) for p in b.params] for b in self.buckets]:
            self.buckets = self._make_buckets(plan)

    # --- the optimizer's view of the parameters -------------------------------------------
    @property
    def optimizer_params(self) -> list[nn.Parameter]:
        """What the optimizer steps and clipping measures: the model parameters, or under ZeRO
        this rank's flat shard of every bucket plus the parameters that are not reduced."""
        if not self.zero:
            return self.params
        return [b.shard_param for b in self.buckets] + self.local_params

    def held_grad_bytes(self) -> int:
        """Gradient bytes this rank holds at the end of backward: every bucket at full size (the
        reduction happens in place; zero=2 adds the reduced shard), plus the gradients of the
        parameters that are not reduced. Under ZeRO the optimizer sees only the shards, so this,
        not the optimizer's view, is what ``memory_report`` shows."""
        sizes = sorted(b.numel * b.params[0].element_size() for b in self.buckets)
        # zero=2: a bound, the largest buckets in flight plus one being filled
        full = sum(sizes[-(ZERO2_IN_FLIGHT + 1):] if self.zero == 2 else sizes)
        shards = sum(b.shard_grad.numel() * b.shard_grad.element_size() for b in self.buckets
                     if self.zero == 2 and b.shard_grad is not None)
        return full + shards + sum(p.numel() * p.element_size() for p in self.local_params if p.requires_grad)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """ZeRO steps flat slices of several tensors: only elementwise optimizers are exact."""
        if self.zero:
            check_elementwise(optimizer)

    # --- accumulation ------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally and launch no collective."""
        self._no_sync_depth += 1
        try:
            yield
        finally:
            self._no_sync_depth -= 1

    def _on_grad(self, p: nn.Parameter) -> None:
        bucket, slot = self._where[id(p)]
        if self._rebuild_in and not bucket.seen[slot]:
            self._arrival.append(p)
        bucket.seen[slot] = True
        if not self.sync or self._no_sync_depth or id(p) in self._last:
            return
        if bucket.arrived[slot]:
            raise RuntimeError(
                f"a gradient of shape {tuple(bucket.params[slot].shape)} arrived twice in the last "
                "backward of a step, after its bucket may already be reduced; run only one backward "
                "per microbatch (reentrant activation checkpointing does this: use use_reentrant=False)")
        bucket.arrived[slot] = True
        bucket.ready += 1
        while self._next < len(self.buckets) and \
                self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])

    def _launch(self, bucket: Bucket) -> None:
        if self.zero == 2:
            self._fill(bucket)
            self._in_flight.append(bucket)
            if len(self._in_flight) > ZERO2_IN_FLIGHT:
                self._release(self._in_flight.pop(0))
            bucket.handle = reduce_scatter_grads(bucket.shard_grad, bucket.grad, bucket.group)
        else:
            bucket.handle = all_reduce_grads(bucket.grad, bucket.group)
        self._next += 1

    def _fill(self, bucket: Bucket) -> None:
        """zero=2: move the parameters' gradients into a fresh flat buffer for the reduce-scatter
        (unless they already are views into one: the first step of a pipeline)."""
        if bucket.grad is not None:
            return
        # One concatenation, not a copy kernel per parameter: the offsets are contiguous and only
        # the tail is padding (to a multiple of the group size).
        parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in bucket.params]
        used = bucket.offsets[-1] + bucket.params[-1].numel()
        parts.append(bucket.params[0].new_zeros(bucket.numel - used))
        bucket.grad = torch.cat(parts)
        for p in bucket.params:
            p.grad = None

    def _release(self, bucket: Bucket) -> None:
        """zero=2: once its reduce-scatter is done, a bucket's full buffer is dropped."""
        bucket.handle.wait()
        bucket.handle = None
        bucket.grad = None
        for p in bucket.params:
            p.grad = None

    # --- end of step ---------------------------------------------------------------------------
    def finish(self, mean_of: int = 1, on_reduced: Callable[[list[nn.Parameter]], None] | None = None) -> None:
        """Launch the buckets backward did not complete (unused parameters, or no syncing
        backward at all), then wait once for every reduction. Afterwards each ``.grad`` (or ZeRO
        shard gradient) holds the serial gradient; ``mean_of=k`` divides it by k, for gradients
        summed over k steps' backward passes (accumulation across ``step`` calls).

        ``on_reduced(params)`` is told, bucket by bucket in reduction order, that these
        parameters' gradients are final, so a host offload can start copying them while later
        buckets are still being reduced (on CUDA ``wait`` only orders the streams, so the copies
        queue behind each bucket's reduction, not behind the last one). It is called only when
        nothing here changes a gradient after its wait: no ZeRO, ``mean_of=1``, the unused
        parameters known and the layout fixed; otherwise the receiver takes them at the step."""
        if self._no_sync_depth:
            raise RuntimeError("finish() inside no_sync(): leave no_sync before the step that syncs")
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        early = on_reduced is not None and not self.zero and mean_of == 1 and self._unused is not None \
            and self._rebuild_in is None
        unused = {id(p) for p in self._unused or ()}
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None
            if early:
                on_reduced([p for p in bucket.params if id(p) not in unused])
        self._in_flight = []
        if mean_of != 1:
            reduced = [b.shard_grad if self.zero == 2 else b.grad for b in self.buckets]
            torch._foreach_mul_(reduced + [p.grad for p in self.local_params if p.grad is not None], 1.0 / mean_of)
        if self._unused is None:
            self._unused = self._find_unused()
        for p in self._unused:
            bucket, slot = self._where[id(p)]
            if bucket.seen[slot]:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} got no gradient on any rank in the first "
                    "step but has one now; autopar assumes the set of unused parameters is fixed")
            p.grad = None
        if self._rebuild_in is not None:
            self._rebuild_in -= 1
            if self._rebuild_in == 0:
                self._rebuild_in = None
                self._rebuild()
                for p in self._unused:
                    p.grad = None
        if self.zero == 2:
            for bucket in self.buckets:  # the reduced gradient lives in the shard only
                for p in bucket.params:
                    p.grad = None
                bucket.grad = None
        self._next = 0

    def _find_unused(self) -> list[nn.Parameter]:
        """Parameters that produced no gradient on any rank of their group. First step only: it
        costs a tiny all-reduce per bucket and a host sync."""
        unused = []
        for bucket in self.buckets:
            seen = torch.tensor(bucket.seen, dtype=torch.float32, device=bucket.params[0].device)
            dist.all_reduce(seen, group=bucket.group)
            unused += [p for p, s in zip(bucket.params, seen.tolist()) if s == 0]
        if unused and self.zero:
            raise ValueError(
                f"{len(unused)} parameter(s) (shapes {[tuple(p.shape) for p in unused[:5]]}) got no "
                "gradient on any rank; with zero=1/2 they would be stepped with a zero gradient, "
                "unlike a serial run. Freeze them (requires_grad_(False)) or use zero=0")
        return unused

    def after_step(self) -> None:
        """After the optimizer step: under ZeRO all-gather the updated shards into every
        replica; then clear the gradients for the next step: buckets zeroed in place with every
        ``.grad`` pointing into them again, other parameters' ``.grad`` set to None."""
        if self.zero:
            gather_params(self.buckets)
        for bucket in self.buckets:
            if self.zero == 2:  # the next buffer is made when the bucket is complete
                bucket.attach_grads_to_shard()
            elif bucket.grad is None:
                bucket.allocate_grad()
            else:
                bucket.grad.zero_()
                bucket.attach_grads()
            bucket.reset()
        for p in self.local_params:
            p.grad = None
