"""Parallel twins of subclasses of the swapped layers (Gemma's and BART's scaled embeddings).

Many models subclass ``nn.Embedding`` / ``nn.Linear`` only to add elementwise work around the
base computation: ``GemmaTextScaledWordEmbedding.forward`` is ``super().forward(ids) * scale``.
Left serial, such a layer keeps its weight whole while the tied ``lm_head`` (an exact
``nn.Linear``) is sharded, and the two silently stop sharing a tensor. So a subclass is built as
``class Parallel<Name>(<Name>, <parallel base>)``: its own ``__init__`` and ``forward`` run
unchanged, and ``super().forward`` inside them reaches the sharded forward, whose output is the
ordinary full-feature activation (layers in the sharded layout of ``chain`` are never such
subclasses, see ``auto``).

Which subclasses qualify is decided from the source of the methods they override, and only
the ones that provably leave the base computation alone do:

* ``forward`` must be overridden and call ``super().forward``, and never read ``self.weight`` /
  ``self.bias`` other than for ``.dtype``, ``.device`` or ``.shape``. A subclass that does not
  override ``forward`` is often used through its raw weight by its owner (``nn.MultiheadAttention``'s
  ``out_proj`` goes through ``F.multi_head_attention_forward``), so it stays serial too.
* no override of ``_load_from_state_dict`` / ``state_dict`` hooks of the base's machinery
  (checked: ``_load_from_state_dict``, ``_save_to_state_dict``).

A subclass's own ``reset_parameters`` becomes the parallel twin's ``serial_init``, so re-init
still draws the full tensor (``ShardedModule.reset_parameters``).

Some subclasses re-implement the base computation instead of calling it: Falcon's
``FalconLinear.forward`` is ``input @ self.weight.T (+ self.bias)``, so every layer of a Falcon
stayed whole. A ``Linear`` subclass whose forward fails the source rules above still gets a twin
when its forward *is* ``F.linear`` on a probe (``computes_linear``): the class's forward run on a
stand-in instance (a 3 x 5 float64 weight, with and without bias, on inputs of two scales) must
give ``F.linear``'s result, shape and dtype. Such a twin drops the subclass's forward for the
sharded one; a forward that touches anything else (other attributes, other work) fails the probe
and the layer stays whole, named in the log as before.
"""
from __future__ import annotations

import inspect
import re
import textwrap

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ShardedModule

_WEIGHT_READ = re.compile(r"self\.(weight|bias)\b(?!\.(dtype|device|shape)\b)")
_SUPER_FORWARD = re.compile(r"super\(\s*(\w+\s*,\s*self\s*)?\)\.forward\(")
_STATE_METHODS = ("_load_from_state_dict", "_save_to_state_dict")

_twins: dict[type, type | str] = {}  # subclass -> its parallel twin, or why it has none


def _overrides(cls: type, base: type, name: str) -> bool:
    return any(name in k.__dict__ for k in cls.__mro__[:cls.__mro__.index(base)])


def why_serial(cls: type, base: type) -> str:
    """Why the subclass ``cls`` of the swapped class ``base`` cannot get a parallel twin ("" if it can)."""
    if not _overrides(cls, base, "forward"):
        return f"{cls.__name__} subclasses {base.__name__} without its own forward (its owner may use the raw weight)"
    for name in _STATE_METHODS:
        if _overrides(cls, base, name):
            return f"{cls.__name__} overrides {name}"
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return f"the source of {cls.__name__}.forward is not available"
    if not _SUPER_FORWARD.search(source):
        return f"{cls.__name__}.forward does not call super().forward"
    if _WEIGHT_READ.search(source):
        return f"{cls.__name__}.forward reads self.weight / self.bias itself"
    return ""


def computes_linear(cls: type) -> bool:
    """Whether ``cls.forward`` returns ``F.linear(input, self.weight, self.bias)``, checked on a
    stand-in instance (no ``__init__``: only the weight, the bias and the feature counts). The
    probe's tensors are explicitly on the CPU: ``from_pretrained`` builds under a meta device."""
    try:
        return _probe_linear(cls)
    except Exception:  # noqa: BLE001 - anything the forward needs beyond the stand-in: not proven
        return False


def _probe_linear(cls: type) -> bool:
    g = torch.Generator().manual_seed(0)
    cpu = dict(generator=g, dtype=torch.float64, device="cpu")
    probe = object.__new__(cls)
    nn.Module.__init__(probe)
    probe.in_features, probe.out_features = 5, 3
    for with_bias in (True, False):
        probe.weight = nn.Parameter(torch.randn(3, 5, **cpu))
        probe.bias = nn.Parameter(torch.randn(3, **cpu)) if with_bias else None
        for scale in (1.0, 1e3):
            x = torch.randn(2, 4, 5, **cpu) * scale
            with torch.no_grad():
                out = cls.forward(probe, x)
            ref = F.linear(x, probe.weight, probe.bias)
            if not (isinstance(out, torch.Tensor) and out.shape == ref.shape and out.dtype == ref.dtype
                    and torch.allclose(out, ref, rtol=1e-12, atol=1e-12 * scale)):
                return False
    return True


def twin(cls: type, base: type, parallel: type[ShardedModule]) -> type | str:
    """The parallel twin of ``cls`` (built once per class), or why there is none."""
    found = _twins.get(cls)
    if found is None:
        why = why_serial(cls, base)
        own_forward = not why
        # Only the forward's source failed (it has its own, no state-dict overrides): prove it instead.
        forward_only = _overrides(cls, base, "forward") and not any(_overrides(cls, base, n) for n in _STATE_METHODS)
        if why and forward_only and issubclass(base, nn.Linear) and computes_linear(cls):
            why = ""
        if why:
            found = why
        else:
            namespace: dict[str, object] = {"__module__": cls.__module__, "__qualname__": f"Parallel{cls.__qualname__}",
                                            "reset_parameters": ShardedModule.reset_parameters}
            if not own_forward:  # proven to be the base computation: the sharded forward replaces it
                namespace["forward"] = parallel.forward
            if _overrides(cls, base, "reset_parameters"):
                namespace["serial_init"] = cls.reset_parameters
            found = type(f"Parallel{cls.__name__}", (cls, parallel), namespace)
        _twins[cls] = found
    return found


def serial_base(cls: type, swapped: dict[type, type]) -> type | None:
    """The swapped class that ``cls`` strictly derives from, if any."""
    return next((b for b in cls.__mro__[1:] if b in swapped), None) if isinstance(cls, type) and \
        issubclass(cls, nn.Module) else None
