"""The reference every parallel test compares against: plain one-process training on the
whole global batches, with serial clipping."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def train_serial(model: torch.nn.Module, batches: Iterable[Any], optimizer: Callable,
                 loss_fn: Callable, clip: float | None = None):
    """Train ``model`` on ``batches`` of ``(inputs, target)``; returns (losses, state_dict, optimizer)."""
    opt = optimizer(model.parameters())
    losses = []
    for batch in batches:
        loss = loss_fn(model(batch[0]), batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict(), opt
