"""The pipeline runtime: one rank's chunks of an unmodified model, driven by a schedule.

Every rank keeps the model object and runs its real ``forward``; only the units (see
``split``) are intercepted. For a pass of chunk ``c`` (call positions ``start..end``):

* a unit before ``start`` does not run: it returns the tensors received from the previous stage
  where they are needed later, and cheap zero stand-ins (with the traced shapes) elsewhere;
* a unit inside the chunk runs as usual (optionally under activation checkpointing);
* after the chunk's last unit the pass stops (``_ChunkDone``), unless it is the last chunk,
  which runs to the end of the forward and the loss.

The glue code between units therefore runs on every stage, which is what keeps masks, position
ids and other non-tensor values right without shipping them. Units of other stages are
stripped of their storage (1-element stand-ins with the right shape, dtype and device) so a
rank only holds its own weights. Modules are only moved between owners, never rebuilt, so a
unit may contain tensor-parallel layers.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from ..runtime.batch import split_batch
from ..runtime.grid import Grid, coords_of, rank_of
from ..runtime.params import mark_norm_duplicate
from ..runtime.state import new_group
from .comm import P2P
from .schedules import Action, build_schedule, check_schedule
from .split import Flow, Key, TensorMeta, Tracer, UntraceableModel, find_units, forced_bounds, log_split, partition, unit_costs
from .zero_bubble import backward_input, backward_weight

LOOKAHEAD = 2  # receives posted this many actions ahead, so transfers overlap compute
ACT, GRAD = 0, 1


class _ChunkDone(BaseException):
    """Ends a forward pass after the chunk's last unit. A BaseException so that no
    ``except Exception`` in model code can swallow it."""


@dataclass
class _Pass:
    start: int
    end: int
    last: bool
    checkpoint: bool
    received: dict[Key, torch.Tensor]
    keep: frozenset[Key]
    produced: dict[Key, torch.Tensor]


def _signature(batch: Any) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor))


class Pipeline:
    """Splits ``model`` into ``pp * virtual_stages`` chunks at the first step and runs them."""

    def __init__(self, model: nn.Module, grid: Grid, *, schedule: str, num_microbatches: int,
                 virtual_stages: int, split_points: Sequence[str] | None,
                 recompute: bool | Sequence[int],
                 call: Callable[[nn.Module, Any], Any], loss: Callable[[Any, Any], torch.Tensor],
                 loss_scale: float) -> None:
        pp = grid.sizes["pp"]
        self.model, self.grid, self.schedule = model, grid, schedule
        self.m, self.v, self.pp, self.rank = num_microbatches, virtual_stages, pp, grid.coords["pp"]
        self.chunks = pp * virtual_stages
        self.units = find_units(model, split_points)
        check_schedule(schedule, pp, num_microbatches, virtual_stages, self.units.layers)
        if split_points is not None and len(split_points) + 1 != self.chunks:
            raise ValueError(f"{len(split_points)} split_points make {len(split_points) + 1} stages, but "
                             f"pp*virtual_stages = {self.chunks}; give {self.chunks - 1} split points")
        if isinstance(recompute, bool):
            self.ckpt_stages = set(range(pp)) if recompute else set()
        else:
            self.ckpt_stages = set(recompute)
            if not self.ckpt_stages <= set(range(pp)):
                raise ValueError(f"recompute stages {sorted(self.ckpt_stages)} must be in 0..{pp - 1}")
        if self.ckpt_stages and schedule == "zerobubble":
            raise ValueError("recompute is not supported with schedule='zerobubble' "
                             "(its weight gradients replay saved activations after B); use '1f1b'")
        self.split_points = split_points
        self.call, self.loss, self.loss_scale = call, loss, loss_scale
        self.tracer: Tracer | None = None
        self.flow: Flow | None = None
        self.ctx: _Pass | None = None
        # Set to [] to record (kind, chunk, mb, start, end) per action, start taken once its
        # receives have arrived, i.e. busy time only; host clock, so CPU runs only (bench/).
        self.timeline: list[tuple[str, int, int, float, float]] | None = None
        # Called before every action that accumulates weight gradients, with True for the last
        # such action of its chunk in the step: the engine lets the gradient buckets launch their
        # reductions only then, so they overlap the rest of the schedule's backward work.
        self.on_weight_grads: Callable[[bool], None] | None = None
        self.state_order = list(model.state_dict().keys())
        for i, module in enumerate(self.units.modules):
            module.forward = functools.partial(self._call_unit, i, module.forward)
        model._autopar_pipeline = self

    # -- interception ---------------------------------------------------------------------
    def _call_unit(self, unit: int, forward: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.tracer is not None:
            return self.tracer.call(unit, forward, args, kwargs)
        ctx = self.ctx
        if ctx is None:
            if self.flow is None:
                return forward(*args, **kwargs)
            raise RuntimeError(f"{self.units.names[unit]} is part of a model split over pipeline "
                               "stages; run it through Engine.step")
        pos = self.position.get(unit)
        if pos is None:
            raise UntraceableModel(f"{self.units.names[unit]} was not called in the traced first step; "
                                   "the pipeline split needs the same modules called at every step")
        if pos < ctx.start:
            return self._stand_in(pos, ctx)
        if ctx.checkpoint:
            out = checkpoint(forward, *args, use_reentrant=False, **kwargs)
        else:
            out = forward(*args, **kwargs)
        for j, leaf in enumerate(tree_flatten(out)[0]):
            if (pos, j) in ctx.keep:
                ctx.produced[(pos, j)] = leaf
        if pos == ctx.end - 1 and not ctx.last:
            raise _ChunkDone
        return out

    def _stand_in(self, pos: int, ctx: _Pass) -> Any:
        flow = self.flow
        leaves = []
        for j, meta in enumerate(flow.leaves[pos]):
            if (pos, j) in ctx.received:
                leaves.append(ctx.received[(pos, j)])
            elif isinstance(meta, TensorMeta):  # shared: nothing that uses it reaches the loss
                if meta not in self._zeros:
                    self._zeros[meta] = torch.zeros(meta.shape, dtype=meta.dtype, device=self.grid.device)
                leaves.append(self._zeros[meta])
            else:
                leaves.append(meta)
        return tree_unflatten(leaves, flow.specs[pos])

    # -- planning (first step) --------------------------------------------------------------
    def _plan(self, micro: Any) -> None:
        self.tracer = Tracer(self.units)
        try:
            with self.tracer.counter:
                loss = self.loss(self.call(self.model, micro), micro)
            flow = self.tracer.finish(loss)
        finally:
            self.tracer = None
        costs = unit_costs(self.units, flow)
        bounds = forced_bounds(self.units, flow, self.split_points) if self.split_points is not None \
            else partition(costs, self.chunks)
        self.split_report = log_split(self.units, flow, bounds, costs) if self.grid.rank == 0 else ""
        self.flow, self.bounds, self.costs = flow, bounds, costs
        self.position = {u: pos for pos, u in enumerate(flow.order)}
        self.live = [flow.live(b) for b in bounds]   # live[c]: what enters chunk c
        self.metas = [[flow.leaves[p][j] for p, j in keys] for keys in self.live]
        self.floating = [[i for i, (_, dt) in enumerate(ms) if dt.is_floating_point] for ms in self.metas]
        self.my_chunks = [c for c in range(self.chunks) if c % self.pp == self.rank]
        self.signature = _signature(micro)
        self._zeros: dict[Any, torch.Tensor] = {}
        self._place_units()
        self.p2p = P2P(self.grid.group("pp"), self.grid.ranks("pp"), self.grid.device, self.chunks + 1,
                       self.m, max(len(k) for k in self.live))
        self.actions = build_schedule(self.schedule, self.pp, self.rank, self.m, self.v)
        # Zero bubble accumulates weight gradients in W; the other schedules in B.
        self.grad_kind = "W" if self.schedule == "zerobubble" else "B"
        last = {a.chunk: i for i, a in enumerate(self.actions) if a.kind == self.grad_kind}
        self.final_grad_actions = set(last.values())

    def _chunk_of(self, pos: int) -> int:
        return next(c for c in range(self.chunks) if self.bounds[c] <= pos < self.bounds[c + 1])

    def _place_units(self) -> None:
        """Strip other stages' units; find weights shared across stages (tied embeddings) and
        build, on every rank in the same order, a group per set of stages sharing one."""
        owners: dict[int, set[int]] = {}
        by_id: dict[int, nn.Parameter] = {}
        names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        for pos, u in enumerate(self.flow.order):
            for p in self.units.modules[u].parameters():
                owners.setdefault(id(p), set()).add(self._chunk_of(pos) % self.pp)
                by_id[id(p)] = p
        mine = {u for pos, u in enumerate(self.flow.order) if self._chunk_of(pos) % self.pp == self.rank}
        self.params = [by_id[i] for i in by_id if self.rank in owners[i] and by_id[i].requires_grad]
        stand_ins: dict[int, torch.Tensor] = {}
        for u, module in enumerate(self.units.modules):
            if u in mine or u not in self.position:  # uncalled units stay everywhere, untrained
                continue
            for sub in module.modules():
                sub._autopar_absent = True
                for slot in (sub._parameters, sub._buffers):
                    for name, t in slot.items():
                        if t is not None and id(t) not in stand_ins:
                            stub = torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape)
                            stand_ins[id(t)] = nn.Parameter(stub, requires_grad=False) \
                                if isinstance(t, nn.Parameter) else stub
                        if t is not None:
                            slot[name] = stand_ins[id(t)]
        tied = sorted({tuple(sorted(s)) for s in owners.values() if len(s) > 1})
        self.tied: list[tuple[dist.ProcessGroup, list[nn.Parameter]]] = []
        sizes = self.grid.sizes
        for stages in tied:
            shared = sorted((i for i in owners if tuple(sorted(owners[i])) == stages), key=lambda i: names[i])
            for base in range(self.grid.world_size):
                c = coords_of(base, sizes)
                if c["pp"] != stages[0]:
                    continue
                members = [rank_of({**c, "pp": s}, sizes) for s in stages]
                group = new_group(members)
                if self.grid.rank in members:
                    self.tied.append((group, [by_id[i] for i in shared]))
            if self.rank in stages[1:]:
                for i in shared:
                    mark_norm_duplicate(by_id[i])

    def sync_tied_grads(self) -> None:
        """Sum the gradient of each weight shared by several stages over those stages, so the
        copies take identical optimizer steps and stay equal."""
        for group, params in self.tied:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            offset = 0
            for p, g in zip(params, grads):
                summed = flat[offset:offset + g.numel()].view_as(p)
                # In place: the grad may be a view into a gradient bucket that is reduced next.
                if p.grad is None:
                    p.grad = summed.clone()
                else:
                    p.grad.copy_(summed)
                offset += g.numel()

    def gather_full_state(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Merge every stage's tensors (collective over ``pp``), in the serial model's order."""
        if self.flow is None:
            return local
        parts: list[dict[str, torch.Tensor] | None] = [None] * self.pp
        dist.all_gather_object(parts, local, group=self.grid.group("pp"))
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            for name, t in part.items():
                merged.setdefault(name, t)
        order = {n: i for i, n in enumerate(self.state_order)}
        return dict(sorted(merged.items(), key=lambda kv: order.get(kv[0], len(order))))

    # -- one step ---------------------------------------------------------------------------
    def run(self, batch: Any) -> torch.Tensor:
        """Forward and backward of every microbatch on this rank's chunks; returns the sum of
        the microbatch losses on the last stage (zero elsewhere), detached."""
        micros = split_batch(batch, self.m, "microbatches")
        if self.flow is None:
            self._plan(micros[0])
        if _signature(micros[0]) != self.signature:
            raise ValueError(f"pipeline microbatch shapes are fixed at the first step: "
                             f"{self.signature}, got {_signature(micros[0])}; pad batches to one shape")
        self.total = torch.zeros((), device=self.grid.device)
        self.recvs: dict[tuple[int, int, int], tuple[list[torch.Tensor], list[dist.Work]]] = {}
        self.saved: dict[tuple[int, int], tuple] = {}
        self.deferred: dict[tuple[int, int], Any] = {}
        for i, action in enumerate(self.actions):
            for ahead in self.actions[i:i + LOOKAHEAD]:
                self._post_recv(ahead)
            self._ready = time.perf_counter()
            if action.kind == self.grad_kind and self.on_weight_grads is not None:
                self.on_weight_grads(i in self.final_grad_actions)
            if action.kind == "F":
                self._forward(action, micros[action.mb])
            elif action.kind == "B":
                self._backward(action)
            else:
                backward_weight(self.deferred.pop((action.chunk, action.mb)))
            if self.timeline is not None:
                self.timeline.append((*action, self._ready, time.perf_counter()))
        self.p2p.wait_sends()
        return self.total

    def _post_recv(self, a: Action) -> None:
        if a.kind == "F" and a.chunk > 0:
            key = (ACT, a.chunk, a.mb)
            if key not in self.recvs:
                self.recvs[key] = self.p2p.recv(self.metas[a.chunk], (a.chunk - 1) % self.pp, ACT, a.chunk, a.mb)
        elif a.kind == "B" and a.chunk < self.chunks - 1:
            key = (GRAD, a.chunk + 1, a.mb)
            if key not in self.recvs:
                metas = [self.metas[a.chunk + 1][i] for i in self.floating[a.chunk + 1]]
                self.recvs[key] = self.p2p.recv(metas, (a.chunk + 1) % self.pp, GRAD, a.chunk + 1, a.mb)

    def _take(self, key: tuple[int, int, int]) -> list[torch.Tensor]:
        bufs, works = self.recvs.pop(key)
        for w in works:
            w.wait()
        self._ready = time.perf_counter()
        return bufs

    def _forward(self, a: Action, micro: Any) -> None:
        c = a.chunk
        bufs = self._take((ACT, c, a.mb)) if c > 0 else []
        inputs = [bufs[i].requires_grad_(True) for i in self.floating[c]]
        last = c == self.chunks - 1
        keep = frozenset() if last else frozenset(self.live[c + 1])
        ctx = _Pass(self.bounds[c], self.bounds[c + 1], last, self.rank in self.ckpt_stages,
                    dict(zip(self.live[c], bufs)), keep, {})
        self.ctx = ctx
        try:
            out = self.loss(self.call(self.model, micro), micro)
        except _ChunkDone:
            out = None
        finally:
            self.ctx = None
        if last:
            self.total += out.detach().float()
            outputs = [out]
        else:
            sends = [ctx.produced[k] if k[0] >= ctx.start else ctx.received[k] for k in self.live[c + 1]]
            self.p2p.send(sends, (c + 1) % self.pp, ACT, c + 1, a.mb)
            outputs = [sends[i] for i in self.floating[c + 1]]
        self.saved[(c, a.mb)] = (inputs, outputs)

    def _backward(self, a: Action) -> None:
        c = a.chunk
        inputs, outputs = self.saved.pop((c, a.mb))
        if c == self.chunks - 1:
            grads = [torch.full_like(outputs[0], self.loss_scale)]
        else:
            grads = self._take((GRAD, c + 1, a.mb))
        pairs = [(t, g) for t, g in zip(outputs, grads) if t.requires_grad]
        outs, gs = [t for t, _ in pairs], [g for _, g in pairs]
        if self.schedule == "zerobubble":
            in_grads, self.deferred[(c, a.mb)] = backward_input(outs, gs, inputs, self.params)
        else:
            if outs:
                torch.autograd.backward(outs, gs)
            in_grads = [t.grad for t in inputs]
        if c > 0:
            self.p2p.send([g if g is not None else torch.zeros_like(t) for g, t in zip(in_grads, inputs)],
                          (c - 1) % self.pp, GRAD, c, a.mb)
