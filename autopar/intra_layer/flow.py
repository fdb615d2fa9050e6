"""Which parallel layers hand their output to the next one through per-feature ops only.

``Flow`` is a ``TorchFunctionMode`` active during one observed forward. It tags the output of
every watched layer (a sharded ``Linear`` / ``Conv1D``) with that layer, and carries the tags
through each torch function it can prove acts on every feature on its own, so a tensor's tags
say which layers' outputs it was computed from, feature by feature. Any other use of a tagged
tensor *taints* its producers: they must keep handing out full features.

Why a proof by allowlist and not a numerical check: a candidate verified on one batch could
still differ on another (a ``sum`` over features that happens to be symmetric, a data-dependent
branch), and a check that sharded and full runs agree needs both runs. The allowlist instead
makes every chosen chain exact by construction: on a block of features, each allowed op computes
exactly the same numbers as on the full features (the same elementwise kernel on the same
values), so only the matmuls' summation order changes, as in any other grid.

What is proven safe (kept tagged):
* elementwise activations (ReLU, GELU, SiLU, tanh, sigmoid, ...), ``exp``/``pow``/``sqrt``...;
* ``+ - * /`` where every operand is tagged with the same number of features, or is a number,
  a 0-d tensor or a tensor broadcast along the features (last dimension 1): SwiGLU's
  ``silu(gate) * up``, GELU-tanh's polynomial, scaling by a constant;
* dtype / device casts, ``contiguous``, ``clone``; dropout with ``p == 0`` (an identity);
* reading ``dtype``, ``device``, ``requires_grad``, ``dim``.

Everything else taints, notably: anything that mixes or indexes features (LayerNorm/RMSNorm,
softmax, sums, ``matmul``, ``cat``, slicing), reshapes (attention's head split: safe in AxoNN
only because heads split evenly over y, which needs reasoning about which factor of the reshaped
dimension is cut, so q/k/v -> o are left to a manual ``chain``), reading ``shape`` / ``size``
(code could compute with the feature count), dropout with ``p > 0`` (its mask would be drawn
per block: a valid dropout, but correlated across blocks and not the full layout's draws), any
operand with a full feature dimension that is not tagged, a layer called twice, a tagged tensor
reaching two layers, passed to a layer as a keyword, or returned by the observed module (a
residual connection is an ``add`` with an untagged full-feature operand, so it taints).

Then ``chains()`` lists (producers, consumer): the consumer's input is tagged with exactly
``producers``, and none of them is tainted or reaches another layer.
"""
from __future__ import annotations

import weakref
from collections import Counter
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

_UNARY = ("relu", "relu_", "relu6", "gelu", "silu", "mish", "elu", "selu", "celu", "leaky_relu", "softplus",
          "hardtanh", "hardswish", "hardsigmoid", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "erf", "neg",
          "__neg__", "square", "abs", "sqrt", "rsqrt", "reciprocal", "float", "half", "bfloat16", "double",
          "to", "type_as", "contiguous", "clone")
_BINARY = ("add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
           "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__",
           "__rdiv__", "__itruediv__", "pow", "pow_", "__pow__", "__rpow__")


def _functions(names: Iterable[str]) -> set[Any]:
    return {getattr(ns, n) for n in names for ns in (torch, torch.Tensor, F) if hasattr(ns, n)}


ELEMENTWISE: set[Any] = _functions(_UNARY + _BINARY)
METADATA: list[Any] = [torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,  # method-wrappers: compare by ==
                       torch.Tensor.requires_grad.__get__, torch.Tensor.dim, torch.Tensor.ndim.__get__]
DROPOUT: set[Any] = {F.dropout}


class Flow(TorchFunctionMode):
    """Tags and taints of one observed forward over ``layers`` (see the module docstring).
    The owner calls ``enter_layer`` / ``exit_layer`` around each watched layer (its internals
    are not tracked) and ``returned`` with the observed module's output."""

    def __init__(self, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.watched = {id(layer): layer for layer in layers}
        self._tags: dict[int, tuple[weakref.ref, frozenset[int]]] = {}
        self._inside = 0
        self.calls: Counter[int] = Counter()
        self.consumers: dict[int, set[int]] = {}    # producer -> layers its tagged tensors reach
        self.inputs: dict[int, frozenset[int]] = {}  # consumer -> producers of its input
        self.tainted: set[int] = set()

    def _tag_of(self, t: Any) -> frozenset[int]:
        entry = self._tags.get(id(t)) if isinstance(t, Tensor) else None
        # Keyed by id (tensors hash by id anyway); the weak reference rules out a reused id.
        return entry[1] if entry is not None and entry[0]() is t else frozenset()

    def _tag(self, t: Tensor, tag: frozenset[int]) -> None:
        self._tags[id(t)] = (weakref.ref(t), tag | self._tag_of(t))

    def _taint(self, values: Any) -> None:
        for t in tree_leaves(values):
            self.tainted |= self._tag_of(t)

    def enter_layer(self, layer: nn.Module, args: tuple) -> None:
        key = id(layer)
        self.calls[key] += 1
        tag = self._tag_of(args[0]) if args else frozenset()
        if tag:
            self.inputs[key] = self.inputs.get(key, frozenset()) | tag
            for producer in tag:
                self.consumers.setdefault(producer, set()).add(key)
        self._taint(args[1:])
        self._inside += 1

    def exit_layer(self, layer: nn.Module, kwargs: Mapping[str, Any], output: Any) -> None:
        self._inside -= 1
        self._taint(kwargs)  # an input the pre-hook could not see
        if isinstance(output, Tensor):
            self._tag(output, frozenset({id(layer)}))

    def returned(self, output: Any) -> None:
        """A tagged tensor leaving the observed module would leave it as a block: taint it."""
        stack = [output]
        while stack:
            value = stack.pop()
            if isinstance(value, Mapping):
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
            else:
                self._taint(value)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self._inside:
            return func(*args, **kwargs)
        leaves = tree_leaves((args, kwargs))
        tagged = [t for t in leaves if self._tag_of(t)]
        if not tagged:
            return func(*args, **kwargs)
        tag = frozenset().union(*(self._tag_of(t) for t in tagged))
        out = func(*args, **kwargs)
        if any(func == m for m in METADATA):
            return out
        if self._per_feature(func, args, kwargs, leaves, tagged, out):
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    self._tag(t, tag)
        else:
            self.tainted |= tag
        return out

    @staticmethod
    def _per_feature(func: Any, args: tuple, kwargs: dict, leaves: list, tagged: list[Tensor], out: Any) -> bool:
        if func in DROPOUT:
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            return p == 0
        if func not in ELEMENTWISE:
            return False
        features = {t.shape[-1] if t.dim() else None for t in tagged}
        if len(features) != 1 or None in features:
            return False
        n = features.pop()
        ids = {id(t) for t in tagged}
        untagged = [t for t in leaves if isinstance(t, Tensor) and id(t) not in ids]
        untagged_ok = all(t.dim() == 0 or t.shape[-1] == 1 for t in untagged)
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        return untagged_ok and bool(outs) and all(t.dim() and t.shape[-1] == n for t in outs)

    def chains(self, order: list[nn.Module]) -> list[tuple[list[nn.Module], nn.Module]]:
        """(producers, consumer) pairs that are proven per-feature, consumers in ``order``; a
        layer joins at most one chain (the first in ``order``)."""
        used: set[int] = set()
        found = []
        for consumer in order:
            key = id(consumer)
            producers = self.inputs.get(key, frozenset())
            if not producers or self.calls[key] != 1 or used & (producers | {key}):
                continue
            if any(self.calls[p] != 1 or p in self.tainted or self.consumers.get(p) != {key} for p in producers):
                continue
            found.append(([self.watched[p] for p in sorted(producers, key=lambda p: order.index(self.watched[p]))],
                          consumer))
            used |= producers | {key}
        return found
