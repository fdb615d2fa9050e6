"""Full, unsharded tensors under the serial model's names.

A sharded module publishes its full tensors by defining
``autopar_full_state(self) -> dict[str, Tensor]`` for its *own* parameters and buffers (names
relative to the module, not recursive). This keeps ``checkpoint/`` free of imports from the
parallel axes: it only knows the protocol.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _model_of(engine_or_model: Any) -> nn.Module:
    # A module is taken as is: HF models have a `.model` attribute of their own (the backbone).
    model = engine_or_model if isinstance(engine_or_model, nn.Module) \
        else getattr(engine_or_model, "model", engine_or_model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an autopar Engine or an nn.Module, got {type(engine_or_model).__name__}")
    return model


def full_state_dict(engine_or_model: Any) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, gathered to full size, detached, on the CPU.
    Collective over the grid when the model is sharded: call it on every rank."""
    model = _model_of(engine_or_model)
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if getattr(module, "_autopar_absent", False):  # lives on another pipeline stage
            continue
        prefix = f"{prefix}." if prefix else ""
        gather = getattr(module, "autopar_full_state", None)
        if gather is not None:
            local = gather()
        else:
            local = dict(module.named_parameters(recurse=False))
            local.update((n, b) for n, b in module.named_buffers(recurse=False)
                         if n not in module._non_persistent_buffers_set)
        for name, tensor in local.items():
            if not getattr(tensor, "_autopar_absent", False):  # a glue parameter held elsewhere
                out.setdefault(prefix + name, tensor.detach().to("cpu", copy=True))
    pipeline = getattr(model, "_autopar_pipeline", None)
    return pipeline.gather_full_state(out) if pipeline is not None else out
