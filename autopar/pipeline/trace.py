"""Tracing one microbatch shape through a split model: units on the meta device, glue for real.

A rank holds only its own stage's weights (``stage``), yet every stage needs, for every new
microbatch shape, the shapes of what crosses each boundary and which unit outputs the glue code
(masks, position ids, residual adds, the loss) carries from where to where. So the model's
real ``forward`` runs with every unit intercepted:

* each unit runs on fake tensors (``FakeTensorMode``: meta storage, but the real device, so
  autocast casts as it will in training and the traced dtypes are the ones that cross): its
  parameters and buffers are swapped for fake twins (shape, dtype and autopar's tags, no
  storage) and its tensor inputs for fake copies. That costs no FLOPs, no memory and no
  communication (collectives on such tensors are no-ops, so tensor-parallel layers trace too),
  and it works on every rank whatever it holds;
* the glue runs on real tensors: each unit's output is replaced by fresh zero leaves of the
  traced shape, so data-dependent glue (HF's mask construction looks at the mask's values)
  behaves as in training, and walking the autograd graph of the glue back from a later input
  finds exactly which earlier unit outputs it needs (skip connections over several stages,
  several tensors per boundary, non-tensor values);
* parameters of the expanded modules themselves (CLIP's ``logit_scale``) are glue parameters:
  the same walk records which call position (or the loss) uses each of them, so the engine
  can check they live on the stage that needs them.

A ``FlopCounterMode`` counts the forward FLOPs per unit on the way (meta ops are counted too),
but only in the trace that decides the split: they are its cost model and nothing else reads
them. Later traces (each new microbatch shape, e.g. padded batches of a new length) skip it: a
second Python dispatch mode over every op took 10-30% of a trace.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

Key = tuple[int, int]  # (unit position in call order, index of the tensor in its flattened output)
FINAL = -1             # "call position" of the loss, for glue parameters used there


class TensorMeta(NamedTuple):
    shape: torch.Size
    dtype: torch.dtype


class UntraceableModel(RuntimeError):
    """The model cannot be split automatically; the message names the module and the fix."""


def fix_hint() -> str:
    return ("pass split_points=[...] to autopar.parallelize: the names of the modules that start "
            "stages 1..S-1 (e.g. ['model.layers.4']), each called once per forward")


@dataclass
class Flow:
    """What one traced forward taught us, in call order of the units."""
    order: list[int]                      # unit index (registration order) per call position
    specs: list[Any]                      # pytree spec of each unit's output
    leaves: list[list[Any]]               # per output leaf: a TensorMeta, or the value itself
    flops: list[float] | None             # forward FLOPs of one microbatch, glue included (split trace only)
    deps: list[set[Key]]                  # unit outputs each call position consumes (glue included)
    final_deps: set[Key] = field(default_factory=set)  # what the loss needs
    glue_uses: dict[str, set[int]] = field(default_factory=dict)  # glue parameter -> positions / FINAL

    def live(self, boundary: int) -> list[Key]:
        """Unit outputs produced before call position ``boundary`` and used at or after it."""
        later = set(self.final_deps).union(*self.deps[boundary:])
        return sorted(k for k in later if k[0] < boundary)


def _twin(t: torch.Tensor, fake: FakeTensorMode, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    twin = cache.get(id(t))
    if twin is None:
        twin = fake.from_tensor(t.detach())
        if isinstance(t, nn.Parameter):
            twin = nn.Parameter(twin, requires_grad=False)
            twin.__dict__.update(t.__dict__)  # shard specs and sync tags travel with it
        cache[id(t)] = twin
    return twin


@contextlib.contextmanager
def fake_tensors(module: nn.Module, fake: FakeTensorMode) -> Iterator[None]:
    """Swap every parameter and buffer of ``module`` for a fake twin (shared tensors share one)."""
    saved: list[tuple[dict, str, torch.Tensor]] = []
    cache: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for slot in (sub._parameters, sub._buffers):
            for name, t in slot.items():
                if t is not None:
                    saved.append((slot, name, t))
                    slot[name] = _twin(t, fake, cache)
    try:
        yield
    finally:
        for slot, name, t in saved:
            slot[name] = t


def _sources(values: Any, leaf_keys: dict[int, Key], params: dict[int, tuple[str, bool]],
             uses: dict[str, set[int]], position: int) -> set[Key]:
    """Unit outputs (as leaf tensors) that the tensors in ``values`` were computed from. Glue
    parameters met on the way are recorded as used at ``position``; a unit's parameter met here
    is used by the glue itself, outside its module, so it would not live where it is needed."""
    found: set[Key] = set()
    seen: set[Any] = set()
    stack = []
    for v in tree_flatten(values)[0]:
        if isinstance(v, torch.Tensor) and v.requires_grad:
            if v.grad_fn is None:
                if id(v) in leaf_keys:
                    found.add(leaf_keys[id(v)])
                elif id(v) in params:
                    _use(params[id(v)], uses, position)
            else:
                stack.append(v.grad_fn)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) in leaf_keys:
            found.add(leaf_keys[id(var)])
        if var is not None and id(var) in params:
            _use(params[id(var)], uses, position)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return found


def _use(param: tuple[str, bool], uses: dict[str, set[int]], position: int) -> None:
    name, is_glue = param
    if not is_glue:
        raise UntraceableModel(f"the model's forward uses parameter {name!r} directly, outside its "
                               f"module's forward; {fix_hint()}")
    uses.setdefault(name, set()).add(position)


class Tracer:
    """Runs the model once with every unit intercepted; see the module docstring."""

    def __init__(self, model: nn.Module, names: list[str], modules: list[nn.Module], glue: set[str],
                 device: torch.device, count_flops: bool) -> None:
        self.names, self.modules, self.device = names, modules, device
        # The model's parameters as they are now (stand-ins where another stage holds them).
        self.all_params = dict(model.named_parameters())
        self.params = {id(p): (n, n in glue) for n, p in self.all_params.items()}
        self.leaf_keys: dict[int, Key] = {}
        self.keep: list[torch.Tensor] = []
        self.flow = Flow([], [], [], [] if count_flops else None, [])
        self.counter = FlopCounterMode(display=False) if count_flops else None
        self.mark = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Every parameter takes part in the glue's graph on every rank, stand-ins too, so all
        ranks find the same uses (and raise the same errors)."""
        flags = {n: p.requires_grad for n, p in self.all_params.items()}
        for p in self.all_params.values():
            p.requires_grad_(True)
        try:  # the glue's graph is what the dependencies are read from, even in eval_step
            with torch.enable_grad(), self.counter or contextlib.nullcontext():
                yield
        finally:
            for n, p in self.all_params.items():
                p.requires_grad_(flags[n])

    def call(self, unit: int, forward: Callable, args: tuple, kwargs: dict) -> Any:
        flow = self.flow
        if unit in flow.order:
            raise UntraceableModel(
                f"module {self.names[unit]!r} is called twice in one forward (shared weights), "
                f"so it cannot live on a single stage; {fix_hint()}")
        pos = len(flow.order)
        flow.deps.append(_sources((args, kwargs), self.leaf_keys, self.params, flow.glue_uses, pos))
        # FakeTensorMode's dispatch cache is process-wide and keys on op and argument metadata,
        # so the second and later of a stack of like layers mostly hit it: a quarter less trace
        # time (Llama, 4 layers). Its entries can hold a tensor-parallel unit's process group;
        # ``autopar.destroy()`` clears the cache so that no destroyed group outlives its grid.
        fake = FakeTensorMode(allow_non_fake_inputs=False)
        args, kwargs = tree_map(lambda v: fake.from_tensor(v.detach()) if isinstance(v, torch.Tensor) else v,
                                (args, kwargs))
        try:
            with torch.no_grad(), fake_tensors(self.modules[unit], fake), fake:
                out = forward(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as e:
            raise UntraceableModel(
                f"module {self.names[unit]!r} cannot run on fake tensors to find the shapes "
                f"that cross stages ({type(e).__name__}: {e}); a unit must not read tensor values "
                f"on the host. {fix_hint()}") from e
        if self.counter is not None:
            now = self.counter.get_total_flops()
            flow.flops.append(float(now - self.mark))
            self.mark = now
        leaves, spec = tree_flatten(out)
        metas, fresh = [], []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                metas.append(TensorMeta(leaf.shape, leaf.dtype))
                t = torch.zeros(leaf.shape, dtype=leaf.dtype, device=self.device)
                if t.is_floating_point():
                    t.requires_grad_(True)
                    self.leaf_keys[id(t)] = (pos, len(fresh))
                    self.keep.append(t)
                fresh.append(t)
            else:
                metas.append(leaf)
                fresh.append(leaf)
        flow.order.append(unit)
        flow.specs.append(spec)
        flow.leaves.append(metas)
        return tree_unflatten(fresh, spec)

    def finish(self, loss: torch.Tensor) -> Flow:
        flow = self.flow
        flow.final_deps = _sources(loss, self.leaf_keys, self.params, flow.glue_uses, FINAL)
        if flow.flops:  # the glue after the last unit (the loss) counts with it
            flow.flops[-1] += float(self.counter.get_total_flops() - self.mark)
        return flow
