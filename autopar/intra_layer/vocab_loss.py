"""Cross-entropy on vocabulary shards: the LM head's logits are never gathered.

A parallel LM head cuts the vocabulary over y. Gathering its logits to the full vocabulary
before the loss costs, per rank and microbatch, ``tokens * V`` floats of memory and an
all-gather of ``tokens * V * (y - 1) / y`` (a 128k vocabulary at 8k tokens is 4 GiB of fp32
logits) for a result that needs three numbers per token. On shards, per token:

    m  = max_y(max of the shard)                  one all-reduce (MAX), no gradient
    S  = sum_y(sum of exp(shard - m))             } one all-reduce (SUM) of both, stacked
    zt = sum_y(the target's logit if in the shard) }
    loss = log S + m - zt

and the gradient with respect to a shard is ``softmax(shard) - onehot(target in shard)``,
local to each rank: backward needs no collective (the head's matmul all-reduces its input
gradient over y as always). The x ranks of one y slice hold equal logits and compute equal
losses and gradients, which is what replicated activations carry (``comm``).

The numbers are computed in ``float32`` or wider (``float64`` stays ``float64``), as HF's
``ForCausalLMLoss`` upcasts; so fp32 runs match HF's loss and float64 runs a float64 serial loss.

``Engine`` uses this for Hugging Face causal LMs whose output embedding is a parallel layer cut
over y > 1 (``vocab_parallel_head``): the head then returns its y shard (``out_sharded``) and the
model is called without ``labels``. With ``parallelize(vocab_parallel_loss=True)`` a custom
``loss_fn`` gets the shards and calls ``vocab_parallel_cross_entropy`` itself.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..runtime.grid import Grid
from ..runtime.loss_weights import is_causal_lm
from .comm import COUNTER
from .layers import Linear, feature_axes, spec_of

IGNORE_INDEX = -100


class _ShardedCrossEntropy(torch.autograd.Function):
    """Per-token loss (N,) of shard logits (N, V/y) whose first column is vocabulary ``start``."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, grid: Grid, axis: str, start: int,
                ignore_index: int) -> Tensor:
        group = grid.group(axis)
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        m = z.max(dim=-1).values
        COUNTER.add(f"all_reduce[{axis}]", m, grid.size(axis), 2.0)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = (z - m.unsqueeze(-1)).exp_()
        local = target - start
        inside = (local >= 0) & (local < z.shape[-1]) & (target != ignore_index)
        index = local.clamp(0, z.shape[-1] - 1).unsqueeze(-1)
        picked = z.gather(-1, index).squeeze(-1).masked_fill(~inside, 0)
        sums = torch.stack([e.sum(dim=-1), picked])
        COUNTER.add(f"all_reduce[{axis}]", sums, grid.size(axis), 2.0)
        dist.all_reduce(sums, group=group)
        total, target_logit = sums
        e /= total.unsqueeze(-1)  # the softmax on this shard, kept for backward
        ctx.save_for_backward(e, index, inside, target != ignore_index)
        ctx.dtype = logits.dtype
        loss = total.log() + m - target_logit
        return loss.masked_fill(target == ignore_index, 0)

    @staticmethod
    def backward(ctx, g: Tensor):
        softmax, index, inside, real = ctx.saved_tensors
        grad = softmax.scatter_add(-1, index, -inside.to(softmax.dtype).unsqueeze(-1))
        grad *= (g * real).unsqueeze(-1)
        return grad.to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, head: nn.Module,
                                 ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``head``'s vocabulary-shard logits ``(..., V/y)`` against full
    vocabulary ids ``target`` ``(...)``; as ``F.cross_entropy`` of the gathered logits, with
    ``reduction`` "mean" (over targets that are not ``ignore_index``; 0 when there are none),
    "sum" or "none"."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    spec = spec_of(head.weight)
    if spec is None or not getattr(head, "out_sharded", False):
        raise ValueError(f"{type(head).__name__} does not return vocabulary shards; "
                         "use torch.nn.functional.cross_entropy on its (full) logits")
    grid = head.autopar_grid
    axis = feature_axes(spec, transposed=False)[0]
    width = spec.block_shape[0]
    if logits.shape[-1] != width or logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)}: expected "
                         f"(..., {width}) logits of this rank's vocabulary shard and (...) targets")
    per_token = _ShardedCrossEntropy.apply(logits.reshape(-1, width), target.reshape(-1), grid, axis,
                                           grid.index(axis) * width, ignore_index)
    if reduction == "none":
        return per_token.view(target.shape)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / (target != ignore_index).sum().clamp(min=1)


def sharded_head(model: nn.Module) -> nn.Module | None:
    """The model's output embedding when it is a parallel layer whose vocabulary is cut over
    y > 1 (so it can return vocabulary shards); else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, Linear) or head.in_sharded:
        return None
    spec = spec_of(head.weight)
    if spec is None or feature_axes(spec, transposed=False)[0] != "y":
        return None
    return head if head.autopar_grid.size("y") > 1 else None


def hf_causal_loss(model: nn.Module) -> bool:
    """Whether the model's own loss is HF's causal-LM cross-entropy, computed in its forward
    from the logits alone (``self.loss_function``; BART's head adds a full-vocabulary bias and
    its own loss, an MoE with ``output_router_logits`` adds its router loss)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    if not is_causal_lm(model) or getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return False
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        return False
    return _calls_loss_function(type(model))


def vocab_parallel_head(model: nn.Module, requested: bool | None, custom_loss: bool) -> nn.Module | None:
    """The head whose shards the loss takes, per ``parallelize(vocab_parallel_loss=...)``:
    ``None`` chooses it for HF causal LMs without a ``loss_fn`` whose head is not float64 (HF
    rounds even float64 logits to fp32 for its loss, which only the gathered logits reproduce;
    the shards are computed in the logits' dtype); ``True`` insists (a ``loss_fn`` then calls
    ``vocab_parallel_cross_entropy`` itself) and ``False`` never."""
    if requested is False:
        return None
    head = sharded_head(model)
    if requested is None:
        if custom_loss or head is None or head.weight.dtype == torch.float64 or not hf_causal_loss(model):
            return None
        return head
    if head is None:
        raise ValueError("vocab_parallel_loss=True needs an output embedding (get_output_embeddings()) that "
                         "auto_parallelize sharded with its vocabulary over y > 1")
    if not custom_loss and not hf_causal_loss(model):
        raise ValueError(f"vocab_parallel_loss=True: {type(model).__name__}'s own loss is not HF's causal-LM "
                         "cross-entropy; pass loss_fn calling autopar.vocab_parallel_cross_entropy")
    return head


@functools.cache
def _calls_loss_function(cls: type) -> bool:
    try:
        return "self.loss_function(" in inspect.getsource(cls.forward)
    except (OSError, TypeError):  # no source (compiled, or built at run time): do not guess
        return False


def causal_lm_loss(output: Any, batch: dict, head: nn.Module) -> Tensor:
    """HF's causal-LM loss (shifted labels, mean over labels that are not -100) on ``head``'s
    vocabulary shards."""
    labels = batch["labels"]
    logits = output.logits[..., :-1, :]
    return vocab_parallel_cross_entropy(logits, labels[..., 1:].to(logits.device), head)
