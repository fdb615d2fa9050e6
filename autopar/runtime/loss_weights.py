"""Exact loss normalisation: each microbatch's loss weighted by its share of the global batch.

A serial token loss is the mean over every real item of the global batch (for Hugging Face,
every label that is not -100). Averaging per-microbatch means instead, over dp * z slices and
M microbatches, trains a different objective as soon as padding falls unevenly. So before any
forward, every rank counts the items of each of its microbatches from the batch itself, one
all-reduce (on the device, no host sync) gives the global count N, and microbatch i's mean
loss ``l_i`` over its ``n_i`` items enters as ``l_i * n_i / N``: the sum over every microbatch
of every rank is then exactly the serial mean, and so is every gradient, since the gradient
syncs are plain sums (``runtime.params``).

What is counted:

* Hugging Face models with ``labels`` in a dict batch: labels != -100, after the one-token
  shift of causal LMs (``*ForCausalLM``, ``*LMHeadModel``, ``loss_type == "ForCausalLM"``),
  which is what their loss averages over. Sequence / image classification counts samples;
* a custom ``loss_fn`` with ``loss_items(batch) -> Tensor``: whatever that returns, which must
  be the number of items ``loss_fn`` averages over;
* anything else (a custom ``loss_fn`` alone, batches without labels): every microbatch weighs
  1 / (M * dp * z), exact when every microbatch holds equally many items (per-sample means of
  equal-size microbatches). Losses that are not means over items (contrastive losses over the
  batch) are computed per microbatch and are not the serial loss of the whole batch.

A microbatch without any item contributes zero (its mean would be 0/0).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .grid import Grid

IGNORE_INDEX = -100
ItemCounter = Callable[[Any], torch.Tensor]
Scale = Callable[[torch.Tensor, int], torch.Tensor]


def is_causal_lm(model: nn.Module) -> bool:
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel")) or getattr(model, "loss_type", None) == "ForCausalLM"


def label_counter(model: nn.Module) -> ItemCounter:
    """Counts the labels an HF model's own loss averages over (``None`` without labels)."""
    shifted = is_causal_lm(model)

    def count(batch: Any) -> torch.Tensor | None:
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if not isinstance(labels, torch.Tensor):
            return None
        if shifted:
            labels = labels[..., 1:]
        return (labels != IGNORE_INDEX).sum()
    return count


class LossWeights:
    """Builds, per step, the ``scale(loss, i)`` that turns microbatch means into shares."""

    def __init__(self, counter: ItemCounter | None, grid: Grid) -> None:
        self.counter, self.grid = counter, grid
        self.global_items: torch.Tensor | None = None  # N of the last step (None: equal weights)

    def for_step(self, micros: list[Any]) -> Scale:
        counts = [self.counter(m) for m in micros] if self.counter is not None else None
        if counts is None or any(c is None for c in counts):
            weight = 1.0 / (len(micros) * self.grid.batch_shards)
            self.global_items = None
            return lambda loss, i: loss * weight
        local = torch.stack([torch.as_tensor(c, device=self.grid.device).to(torch.int64).reshape(())
                             for c in counts])
        total = local.sum()
        if self.grid.batch_shards > 1:
            dist.all_reduce(total, group=self.grid.group("dp", "z"))
        self.global_items = total
        # In float64, cast to the loss's own dtype only at use: rounding the shares to fp32
        # here put a 6e-8 relative error on each microbatch's gradient, which AdamW turned
        # into a 4e-6 weight error on float64 runs where the microbatches' gradients cancel.
        shares = local.double() / total.clamp(min=1).double()

        def scale(loss: torch.Tensor, i: int) -> torch.Tensor:
            return torch.where(local[i] > 0, loss, torch.zeros_like(loss)) * shares[i].to(loss.dtype)
        return scale
