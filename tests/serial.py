"""The reference every parallel test compares against: plain one-process training on the
whole global batches, with serial clipping."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def _inputs_first(model: torch.nn.Module, batch: Any) -> Any:
    return model(batch[0])


def hf_call(model: torch.nn.Module, batch: dict) -> Any:
    return model(**batch)


def output_loss(output: Any, batch: Any) -> torch.Tensor:
    return output["loss"]  # HF ModelOutput and plain dicts alike


def train_serial(model: torch.nn.Module, batches: Iterable[Any], optimizer: Callable,
                 loss_fn: Callable, clip: float | None = None, call: Callable = _inputs_first):
    """Train ``model`` on ``batches``, by default of ``(inputs, target)`` (``call=hf_call`` for
    dicts of keyword inputs); returns (losses, state_dict, optimizer)."""
    opt = optimizer(model.parameters())
    losses = []
    for batch in batches:
        loss = loss_fn(call(model, batch), batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict(), opt
