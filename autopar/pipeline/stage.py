"""The pipeline runtime: one rank's chunks of an unmodified model, driven by a program.

The split is made from a trace (``trace``: units on the meta device, so it costs no FLOPs and
no memory): of ``sample_batch`` when the pipeline is built, else of the first microbatch it
runs. Until then the units stay where the user built them (the host); then other stages' units
are stripped (1-element stand-ins with the right shape, dtype and tags, created on the device)
and only this rank's stage is moved to the device. No rank ever holds the whole model there.

Every rank keeps the model object and runs its real ``forward``; only the units are
intercepted. For a pass of chunk ``c`` (call positions ``start..end``):

* a unit before ``start`` does not run: it returns the tensors received from the previous stage
  where they are needed later, and cheap zero stand-ins (with the traced shapes) elsewhere;
* a unit inside the chunk runs as usual (optionally under activation checkpointing);
* after the chunk's last unit the pass stops (``_ChunkDone``), unless it is the last chunk,
  which runs to the end of the forward and the loss.

The glue code between units therefore runs on every stage, which is what keeps masks, position
ids and other non-tensor values right without shipping them. Each new microbatch signature
(shapes and dtypes of the batch) is traced once (``trace``, units on meta) and its plan cached,
so sequence lengths may change from step to step at the cost of one glue-only forward each.
Transfers follow ``program``: grouped launches at exchange points both ends agree on.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten
from torch.utils.checkpoint import checkpoint

from ..runtime.batch import split_batch
from ..runtime.grid import Grid
from .comm import P2P, Meta
from .placement import place_units
from .program import ACT, GRAD, Message, Post, Step, rank_programs
from .schedules import Action, check_schedule
from .split import assign_chunks, call_bounds, find_units, log_split, unit_costs
from .trace import Flow, Key, TensorMeta, Tracer, UntraceableModel, check_traced
from .zero_bubble import backward_input, backward_weight

Scale = Callable[[torch.Tensor, int], torch.Tensor]  # (microbatch loss, index) -> its share of the global loss


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


@dataclass
class Plan:
    """What the trace of one microbatch signature taught every stage."""
    flow: Flow
    bounds: list[int]                 # call position where each chunk starts, plus the end
    position: dict[int, int]          # unit -> call position
    live: list[list[Key]]             # live[c]: unit outputs that enter chunk c
    metas: list[list[TensorMeta]]
    floating: list[list[int]]         # which of them carry gradients back
    zeros: dict[Any, torch.Tensor]


def _signature(batch: Any) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor))


class Pipeline:
    """Splits ``model`` into ``pp * virtual_stages`` chunks at construction and runs them."""

    def __init__(self, model: nn.Module, grid: Grid, *, schedule: str, num_microbatches: int,
                 virtual_stages: int, split_points: Sequence[str] | None,
                 recompute: bool | Sequence[int],
                 call: Callable[[nn.Module, Any], Any], loss: Callable[[Any, Any], torch.Tensor],
                 sample_batch: Any = None) -> None:
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
        self.call, self.loss = call, loss
        self.tracer: Tracer | None = None
        self.ctx: _Pass | None = None
        self.plan: Plan | None = None
        self.plans: dict[tuple, Plan] = {}
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
        # Called once the split is made and ``params`` known (the engine builds its optimizer).
        self.on_split: Callable[[], None] | None = None
        self.chunk_of: dict[int, int] | None = None
        self.params: list[nn.Parameter] = []
        self.tied: list = []
        inside = {id(m) for unit in self.units.modules for m in unit.modules()}
        for module in model.modules():  # the glue's own tensors go to the device now
            if id(module) not in inside:
                module._apply(lambda t: t.to(grid.device), recurse=False)
        if sample_batch is not None:
            micro = split_batch(sample_batch, self.m, "microbatches")[0]
            micro = tree_map_only(torch.Tensor, lambda t: t.to(grid.device), micro)
            flow = self._trace(micro, grid.device)
            self._split(flow)
            self._adopt(_signature(micro), flow)
        self.p2p = P2P(grid.group("pp"), grid.ranks("pp"), grid.device, self.chunks, self.m)
        self.programs: dict[tuple[str, int], list[Step]] = {}
        self.program("train", self.m)
        # NCCL wants every rank of a group in the first batch_isend_irecv on it; a collective
        # first creates the communicator on all of them together.
        dist.all_reduce(torch.zeros(1, device=grid.device), group=grid.group("pp"))

    # -- the split (construction) ------------------------------------------------------------
    def _split(self, flow: Flow) -> None:
        order = flow.order
        costs = unit_costs(self.units, flow)
        self.chunk_of = assign_chunks(self.units, order, costs, self.chunks)
        last = (self.chunks - 1) % self.pp
        self.glue_owners: dict[str, set[int]] = {}
        for name in self.units.glue:
            uses = flow.glue_uses.get(name, set())
            self.glue_owners[name] = {last if p < 0 else self.chunk_of[flow.order[p]] % self.pp
                                      for p in uses} or {last}
        self.split_report = log_split(self.units, order, self.chunk_of, costs, self.chunks) \
            if self.grid.rank == 0 else ""
        self.costs = costs  # per call position
        self.my_chunks = [c for c in range(self.chunks) if c % self.pp == self.rank]
        self.params, self.tied = place_units(self.model, self.units, self.chunk_of, self.glue_owners,
                                             self.grid, self.pp)
        for u, module in enumerate(self.units.modules):
            if u not in self.chunk_of or self.chunk_of[u] % self.pp == self.rank:
                module.to(self.grid.device)
        if self.on_split is not None:
            self.on_split()

    @property
    def bounds(self) -> list[int]:
        return self.plan.bounds if self.plan is not None else []

    @property
    def metas(self) -> list[list[TensorMeta]]:
        return self.plan.metas

    @property
    def floating(self) -> list[list[int]]:
        return self.plan.floating

    def program(self, mode: str, m: int) -> list[Step]:
        key = (mode, m)
        if key not in self.programs:
            schedule = self.schedule if mode == "train" else "forward"
            self.programs[key] = rank_programs(schedule, self.pp, m, self.v)[self.rank]
        return self.programs[key]

    # -- interception ---------------------------------------------------------------------
    def _call_unit(self, unit: int, forward: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.tracer is not None:
            return self.tracer.call(unit, forward, args, kwargs)
        ctx = self.ctx
        if ctx is None:
            raise RuntimeError(f"{self.units.names[unit]} is part of a model split over pipeline "
                               "stages; run it through Engine.step, Engine.eval_step or Engine.forward")
        pos = self.plan.position.get(unit)
        if pos is None:
            raise UntraceableModel(f"{self.units.names[unit]} was not called in the traced forward; "
                                   "the pipeline split needs the same modules called at every step")
        if pos < ctx.start:
            return self._stand_in(pos, ctx)
        if ctx.checkpoint:
            out = checkpoint(forward, *args, use_reentrant=False, **kwargs)
        else:
            out = forward(*args, **kwargs)
        for j, leaf in enumerate(tree_flatten(out)[0]):
            if (pos, j) in ctx.keep:
                check_traced(self.units.names[unit], j, leaf, self.plan.flow.leaves[pos][j])
                ctx.produced[(pos, j)] = leaf
        if pos == ctx.end - 1 and not ctx.last:
            raise _ChunkDone
        return out

    def _stand_in(self, pos: int, ctx: _Pass) -> Any:
        plan = self.plan
        leaves = []
        for j, meta in enumerate(plan.flow.leaves[pos]):
            if (pos, j) in ctx.received:
                leaves.append(ctx.received[(pos, j)])
            elif isinstance(meta, TensorMeta):  # shared: nothing that uses it reaches the loss
                if meta not in plan.zeros:
                    plan.zeros[meta] = torch.zeros(meta.shape, dtype=meta.dtype, device=self.grid.device)
                leaves.append(plan.zeros[meta])
            else:
                leaves.append(meta)
        return tree_unflatten(leaves, plan.flow.specs[pos])

    # -- tracing (once per microbatch signature) --------------------------------------------
    def _trace(self, micro: Any, device: torch.device) -> Flow:
        self.tracer = Tracer(self.model, self.units.names, self.units.modules, set(self.units.glue), device,
                             count_flops=self.chunk_of is None)
        try:
            with self.tracer.active():
                loss = self.loss(self.call(self.model, micro), micro)
            return self.tracer.finish(loss)
        finally:
            self.tracer = None

    def _adopt(self, signature: tuple, flow: Flow) -> Plan:
        bounds = call_bounds(self.units, flow, self.chunk_of, self.chunks, self.glue_owners, self.pp)
        live = [flow.live(b) for b in bounds[:-1]]
        metas = [[flow.leaves[p][j] for p, j in keys] for keys in live]
        plan = Plan(flow, bounds, {u: pos for pos, u in enumerate(flow.order)}, live, metas,
                    [[i for i, (_, dt) in enumerate(ms) if dt.is_floating_point] for ms in metas], {})
        self.plans[signature] = plan
        return plan

    def prepare(self, micro: Any) -> None:
        """Split (if not yet) and plan for ``micro``'s shapes; the engine calls it before it
        enters ``no_sync`` on the first step, whose gradient buckets only the split creates."""
        self._plan_for(micro)

    def _plan_for(self, micro: Any) -> Plan:
        signature = _signature(micro)
        plan = self.plans.get(signature)
        if plan is None:
            flow = self._trace(micro, self.grid.device)
            if self.chunk_of is None:
                self._split(flow)
            plan = self._adopt(signature, flow)
        return plan

    def _metas(self, msg: Message) -> list[Meta]:
        metas = self.plan.metas[msg.chunk]
        return list(metas) if msg.kind == ACT else [metas[i] for i in self.plan.floating[msg.chunk]]

    # -- full state (checkpoints) -------------------------------------------------------------
    def gather_full_state(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Merge every stage's tensors (collective over ``pp``), in the serial model's order."""
        parts: list[dict[str, torch.Tensor] | None] = [None] * self.pp
        dist.all_gather_object(parts, local, group=self.grid.group("pp"))
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            for name, t in part.items():
                merged.setdefault(name, t)
        order = {n: i for i, n in enumerate(self.state_order)}
        return dict(sorted(merged.items(), key=lambda kv: order.get(kv[0], len(order))))

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

    # -- one step ---------------------------------------------------------------------------
    def run(self, micros: list[Any], scale: Scale, mode: str = "train") -> torch.Tensor | list[Any]:
        """Run ``micros`` through this rank's chunks. ``train``: forward and backward, returns
        the sum of the scaled microbatch losses on the last stage (zero elsewhere), detached;
        ``eval``: the same sum, forward only; ``output``: the model outputs on the last stage."""
        self.plan = self._plan_for(micros[0])
        for micro in micros[1:]:
            if _signature(micro) != _signature(micros[0]):
                raise ValueError("microbatches of one step must have equal shapes: "
                                 f"{_signature(micros[0])} and {_signature(micro)}")
        program = self.program("train" if mode == "train" else "forward", len(micros))
        final = {a.chunk: i for i, a in enumerate(program) if isinstance(a, Action) and a.kind == self._grad_kind}
        self.total = torch.zeros((), dtype=torch.float64, device=self.grid.device)
        self.outputs: list[Any] = []
        self.inbox: dict[Message, tuple[list[torch.Tensor], list[dist.Work]]] = {}
        self.outbox: dict[Message, list[torch.Tensor]] = {}
        self.saved: dict[tuple[int, int], tuple] = {}
        self.deferred: dict[tuple[int, int], Any] = {}
        with torch.no_grad() if mode != "train" else torch.enable_grad():
            for i, step in enumerate(program):
                self.p2p.release()
                if isinstance(step, Post):
                    self.inbox.update(self.p2p.post(step, self.outbox, self._metas))
                    continue
                self._ready = time.perf_counter()
                if step.kind == self._grad_kind and self.on_weight_grads is not None and mode == "train":
                    self.on_weight_grads(i == final[step.chunk])
                if step.kind == "F":
                    self._forward(step, micros[step.mb], scale, mode)
                elif step.kind == "B":
                    self._backward(step)
                else:
                    backward_weight(self.deferred.pop((step.chunk, step.mb)))
                if self.timeline is not None:
                    self.timeline.append((*step, self._ready, time.perf_counter()))
        self.p2p.wait_sends()
        return self.outputs if mode == "output" else self.total

    @property
    def _grad_kind(self) -> str:
        """Zero bubble accumulates weight gradients in W; the other schedules in B."""
        return "W" if self.schedule == "zerobubble" else "B"

    def _take(self, msg: Message) -> list[torch.Tensor]:
        bufs, works = self.inbox.pop(msg)
        for w in works:
            w.wait()
        self._ready = time.perf_counter()
        return bufs

    def _forward(self, a: Action, micro: Any, scale: Scale, mode: str) -> None:
        c, plan = a.chunk, self.plan
        bufs = self._take(Message(ACT, c, a.mb)) if c > 0 else []
        train = mode == "train"
        inputs = [bufs[i].requires_grad_(True) for i in plan.floating[c]] if train else []
        last = c == self.chunks - 1
        keep = frozenset() if last else frozenset(plan.live[c + 1])
        ctx = _Pass(plan.bounds[c], plan.bounds[c + 1], last, train and self.rank in self.ckpt_stages,
                    dict(zip(plan.live[c], bufs)), keep, {})
        self.ctx = ctx
        try:
            output = self.call(self.model, micro)
            out = scale(self.loss(output, micro), a.mb) if last and mode != "output" else None
        except _ChunkDone:
            output = out = None
        finally:
            self.ctx = None
        if last:
            if mode == "output":
                self.outputs.append(output)
                return
            self.total += out.detach().double()
            outputs = [out]
        else:
            sends = [ctx.produced[k] if k[0] >= ctx.start else ctx.received[k] for k in plan.live[c + 1]]
            self.outbox[Message(ACT, c + 1, a.mb)] = [t.detach().contiguous() for t in sends]
            outputs = [sends[i] for i in plan.floating[c + 1]]
        if train:
            self.saved[(c, a.mb)] = (inputs, outputs)

    def _backward(self, a: Action) -> None:
        c = a.chunk
        inputs, outputs = self.saved.pop((c, a.mb))
        if c == self.chunks - 1:
            grads = [torch.ones_like(outputs[0])]
        else:
            grads = self._take(Message(GRAD, c + 1, a.mb))
        pairs = [(t, g) for t, g in zip(outputs, grads) if t.requires_grad]
        outs, gs = [t for t, _ in pairs], [g for _, g in pairs]
        if self.schedule == "zerobubble":
            in_grads, self.deferred[(c, a.mb)] = backward_input(outs, gs, inputs, self.params)
        else:
            if outs:
                torch.autograd.backward(outs, gs)
            in_grads = [t.grad for t in inputs]
        if c > 0:
            self.outbox[Message(GRAD, c, a.mb)] = [
                (g if g is not None else torch.zeros_like(t)).contiguous() for g, t in zip(in_grads, inputs)]
