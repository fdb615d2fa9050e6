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

Like units are traced once: a unit whose class, submodules, hyperparameters, parameter shapes
and input shapes equal those of a unit already traced takes that unit's output shapes (and
FLOPs) without running. A decoder stack costs one layer's trace, not one per layer (0.1-0.4 s
each on fake tensors), at every new microbatch shape. HF's ``layer_idx`` is left out of the
comparison: each layer has its own, and it only indexes the layer's KV-cache slot; what it
derives (a sliding window, an attention type) is stored and compared. Other objects among the
inputs must be the very same ones (HF hands every layer one KV-cache object, unused in
training), and a unit that returns such an object is always traced. The pipeline checks at run
time that what a unit really sends has the traced shape (``check_traced``), so a wrong guess
is an error that names the unit, not a wrong-sized message; ``AUTOPAR_TRACE_EVERY_UNIT=1``
turns the reuse off.

Fused MoE experts (transformers' ``@use_experts_implementation`` classes) are traced with the
``batched_mm`` implementation whatever the model is configured with (``shape_only_experts``):
``eager`` indexes with ``nonzero`` (an output shape that depends on the routing's values) and
``grouped_mm`` has no fake-tensor kernel outside bf16, so the default Mixtral or Qwen-MoE
would not trace at all. All three give the experts' output the input's shape; training runs
the configured one.
"""
from __future__ import annotations

import contextlib
import os
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


TRACEABLE_EXPERTS = "batched_mm"


@contextlib.contextmanager
def shape_only_experts(module: nn.Module) -> Iterator[None]:
    """Switch ``module``'s fused experts to an implementation that runs on fake tensors."""
    configs = {id(m.config): m.config for m in module.modules()
               if hasattr(m, "_is_expert_parallel") and hasattr(getattr(m, "config", None), "_experts_implementation")}
    saved = {key: cfg._experts_implementation for key, cfg in configs.items()}
    for cfg in configs.values():
        cfg._experts_implementation = TRACEABLE_EXPERTS
    try:
        yield
    finally:
        for key, cfg in configs.items():
            cfg._experts_implementation = saved[key]


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


_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)
_PER_LAYER = frozenset({"layer_idx"})  # see the module docstring
EVERY_UNIT_ENV = "AUTOPAR_TRACE_EVERY_UNIT"  # "1": trace every unit, like or not


def _plain(value: Any) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))


def _structure(module: nn.Module) -> tuple:
    """What decides a unit's output shapes, short of running it: every submodule's class,
    ``extra_repr`` and plain attributes, every parameter's and buffer's shape, dtype and tags."""
    subs = tuple((name, type(sub), sub.extra_repr(),
                  tuple((k, v) for k, v in vars(sub).items()
                        if not k.startswith("_") and k not in _PER_LAYER and _plain(v)))
                 for name, sub in module.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype,
                     tuple(sorted((k, v if _plain(v) else repr(v)) for k, v in vars(t).items())))
                    for name, t in (*module.named_parameters(), *module.named_buffers()))
    return subs, tensors


def _input_key(args: tuple, kwargs: dict) -> tuple:
    """Shapes and plain values of a unit's inputs; any other object by identity."""
    leaves, spec = tree_flatten((args, kwargs))
    key: list[Any] = [str(spec)]
    for v in leaves:
        if isinstance(v, torch.Tensor):
            key.append((tuple(v.shape), v.dtype, v.device, v.requires_grad))
        else:
            key.append((type(v), v) if _plain(v) else (type(v), id(v)))
    return tuple(key)


def check_traced(name: str, j: int, leaf: Any, meta: Any) -> None:
    """What crosses a stage boundary must have its traced shape: the receiver sizes its buffer
    from the trace, and NCCL does not check sizes."""
    if not isinstance(leaf, torch.Tensor) or (isinstance(meta, TensorMeta) and (leaf.shape, leaf.dtype) == meta):
        return
    traced = f"{tuple(meta.shape)} {meta.dtype}" if isinstance(meta, TensorMeta) else repr(meta)
    raise UntraceableModel(
        f"{name} returned {tuple(leaf.shape)} {leaf.dtype} as output {j}, where its trace gave {traced}: "
        "its output shapes depend on the values of its inputs, or on more than its class, hyperparameters "
        f"and input shapes when a like unit's trace stood for it ({EVERY_UNIT_ENV}=1 traces every unit)")


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
        # (class, structure, inputs) -> (output leaves, spec, the unit's own FLOPs)
        self.traced: dict[tuple, tuple[list[Any], Any, float]] = {}
        self.reuse = os.environ.get(EVERY_UNIT_ENV, "0") != "1"

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
        module = self.modules[unit]
        key = (type(module), _structure(module), _input_key(args, kwargs)) if self.reuse else None
        if key in self.traced:
            leaves, spec, own = self.traced[key]
            self._count(own)
            return self._adopt(pos, unit, leaves, spec)
        before = self.counter.get_total_flops() if self.counter is not None else 0
        # FakeTensorMode's dispatch cache is process-wide and keys on op and argument metadata,
        # so the second and later of a stack of like layers mostly hit it: a quarter less trace
        # time (Llama, 4 layers). Its entries can hold a tensor-parallel unit's process group;
        # ``autopar.destroy()`` clears the cache so that no destroyed group outlives its grid.
        fake = FakeTensorMode(allow_non_fake_inputs=False)
        args, kwargs = tree_map(lambda v: fake.from_tensor(v.detach()) if isinstance(v, torch.Tensor) else v,
                                (args, kwargs))
        try:
            with torch.no_grad(), fake_tensors(module, fake), shape_only_experts(module), fake:
                out = forward(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as e:
            raise UntraceableModel(
                f"module {self.names[unit]!r} cannot run on fake tensors to find the shapes "
                f"that cross stages ({type(e).__name__}: {e}); a unit must not read tensor values "
                f"on the host. {fix_hint()}") from e
        own = float(self.counter.get_total_flops() - before) if self.counter is not None else 0.0
        self._count(0.0)
        leaves, spec = tree_flatten(out)
        if key is not None and all(isinstance(v, torch.Tensor) or _plain(v) for v in leaves):
            self.traced[key] = (leaves, spec, own)
        return self._adopt(pos, unit, leaves, spec)

    def _count(self, skipped: float) -> None:
        """FLOPs of the call position just traced: the counter's advance since the last one
        (glue and unit), plus ``skipped``, those of a like unit that did not run."""
        if self.counter is not None:
            now = self.counter.get_total_flops()
            self.flow.flops.append(float(now - self.mark) + skipped)
            self.mark = now

    def _adopt(self, pos: int, unit: int, leaves: list[Any], spec: Any) -> Any:
        """Record the unit's output at ``pos``; return fresh zero leaves of its shapes for the glue."""
        flow = self.flow
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
