"""Activation recompute: keep only a block's inputs in forward and re-run it in backward.

``recompute=True`` picks the repeated blocks of the model: the children of every
``nn.ModuleList`` / ``nn.Sequential`` reached from the root without passing through another one
(the transformer layers of a Hugging Face model, the stages of a Sequential). A callable
``policy(name, module) -> bool`` picks modules by qualified name instead; a module inside one
already chosen is not wrapped again, since nested recompute only repeats work.

The module itself is left in place (names, state dict, hooks unchanged); only its ``forward`` is
replaced by one running under ``torch.utils.checkpoint`` with ``use_reentrant=False``, which
restores the RNG state so dropout draws the same mask twice, and supports keyword arguments.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

RecomputePolicy = Union[bool, Callable[[str, nn.Module], bool]]


class _Recomputed:
    """Replacement ``forward``: the module's own forward under checkpoint while grads are on."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def repeated_blocks(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
        return [(prefix + name, child) for name, child in module.named_children()]
    found = []
    for name, child in module.named_children():
        found += repeated_blocks(child, f"{prefix}{name}.")
    return found


def _chosen(model: nn.Module, policy: Callable[[str, nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") or not outer for outer, _ in chosen):
            continue
        if policy(name, module):
            chosen.append((name, module))
    return chosen


def apply_recompute(model: nn.Module, policy: RecomputePolicy) -> list[str]:
    """Wrap the modules ``policy`` selects; returns their qualified names ("" is the root)."""
    if policy is False:
        return []
    if policy is True:
        chosen = repeated_blocks(model)
        if not chosen:
            raise ValueError("recompute=True found no repeated blocks (no nn.ModuleList or nn.Sequential "
                             "with more than one child); pass recompute=lambda name, module: ... to "
                             "choose the modules to recompute")
    elif callable(policy) and not isinstance(policy, nn.Module):
        chosen = _chosen(model, policy)
    else:
        raise ValueError(f"unknown recompute {policy!r}; use False, True, or a callable "
                         "policy(name, module) -> bool")
    for _, module in chosen:
        if not isinstance(module.forward, _Recomputed):
            module.forward = _Recomputed(module.forward)
    config = getattr(model, "config", None)
    if chosen and getattr(config, "use_cache", False):
        # A KV cache filled in forward would be filled again by the recompute.
        config.use_cache = False
    return [name for name, _ in chosen]
