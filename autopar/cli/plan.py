"""``autopar plan``: predicted memory and communication per rank for a model on candidate grids.

Shape only: the model is built on the meta device (no memory, no weights) and every figure
comes from its parameter shapes and simple cost figures, so a user can compare grids for a
model that does not fit anywhere yet. What is counted, per rank and training step, in fp32:

* memory: parameters, gradients and AdamW state (4 + 4 + 8 bytes per parameter this rank holds)
  plus activations, ``(68 + 10 a s / h) s b h`` bytes per block (Korthikanti et al.'s
  estimate, in fp32), for the microbatches 1F1B keeps in flight;
* communication (bytes a rank sends): ``z`` all-gathers each weight block in forward and
  reduce-scatters its gradient, per microbatch; ``x``/``y`` all-reduce and all-gather layer
  outputs in forward and input gradients in backward (autopar keeps full-feature activations
  between layers); ``dp`` ring all-reduces the gradients once per step; ``pp`` sends one
  activation forward and one gradient back per microbatch.

Layers whose weight does not divide the grid stay replicated, as ``auto_parallelize`` does;
the pipeline is assumed to split the repeated blocks evenly and to keep the rest (embeddings,
heads) on the end stages.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
from typing import Collection

import torch
from torch import nn

from ..intra_layer.layout import divisible, linear_weight_spec
from ..pipeline.split import find_blocks
from ..runtime.grid import resolve_sizes
from . import models

GIB = 2.0 ** 30


@dataclasses.dataclass(frozen=True)
class Layer:
    """A weight ``auto_parallelize`` would shard: ``out x in`` features, in a block or not, and
    the numel of its own bias (cut over y with the output; 0 when it has none or it is tied to
    another module, which keeps it whole)."""

    out_features: int
    in_features: int
    in_block: bool
    bias: int = 0


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: list[Layer]
    other_params: int        # norms, tied biases, layers left replicated by their type
    other_in_blocks: int     # of which inside the repeated blocks
    blocks: int
    hidden: int | None
    heads: int | None
    seq_len: int


def _seq_len(config: object, requested: int | None) -> int:
    if requested:
        return requested
    if hasattr(config, "image_size"):  # patches + the class token
        return (config.image_size // config.patch_size) ** 2 + 1
    return min(1024, getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024))


def shape_of(model: nn.Module, seq_len: int | None, held: Collection[str] | None = None) -> Shape:
    """The shapes ``predict`` counts, of the whole model or, with ``held`` (qualified parameter
    names), of the part one pipeline stage holds: ``autopar plan --dry-run`` takes those names
    from the real split and checks its real shards against this count."""
    from transformers.pytorch_utils import Conv1D

    block_names = find_blocks(model)
    block_prefixes = tuple(f"{n}." for n in block_names)
    blocks = sum(len(model.get_submodule(n)) for n in block_names)
    if held is not None:  # the stage's blocks: those it holds a parameter of
        blocks = sum(any(p.startswith(f"{n}.{i}.") for p in held)
                     for n in block_names for i in range(len(model.get_submodule(n))))
    layers, other, other_blocks, seen, owner = [], 0, 0, set(), None
    for name, module in model.named_modules():
        in_block = name.startswith(block_prefixes)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or held is not None and f"{name}.{pname}".lstrip(".") not in held:
                continue
            seen.add(id(p))
            parallel = type(module) in (nn.Linear, nn.Embedding, Conv1D)
            if pname == "weight" and parallel and p.dim() == 2:
                out_f, in_f = p.shape if type(module) is not Conv1D else p.shape[::-1]
                layers.append(Layer(out_f, in_f, in_block))
                owner = module
            elif pname == "bias" and parallel and layers and owner is module:
                layers[-1] = dataclasses.replace(layers[-1], bias=p.numel())
            else:
                other += p.numel()
                other_blocks += p.numel() if in_block else 0
    cfg = getattr(model, "config", None)
    return Shape(layers, other, other_blocks, blocks, getattr(cfg, "hidden_size", None),
                 getattr(cfg, "num_attention_heads", None), _seq_len(cfg, seq_len))


def predict(shape: Shape, sizes: dict[str, int], global_batch: int, microbatches: int,
            stage: int | None = None) -> dict[str, float]:
    """Bytes per rank: memory by kind and communication by axis. By default for the busiest
    stage of an even split; with ``stage``, ``shape`` is what pipeline stage ``stage`` holds
    (``shape_of(..., held=...)``), every part of it counted whole, and the 1F1B microbatches in
    flight and the pp sends are that stage's."""
    pp, dp, z, y, x = (sizes[a] for a in ("pp", "dp", "z", "y", "x"))
    tp = {"x": x, "y": y, "z": z}
    tokens = global_batch * shape.seq_len / (dp * z)       # this rank's tokens per step
    ends = min(pp, 2) if stage is None else 1  # embeddings and heads sit on the first and last stage
    blocks = pp if stage is None else 1
    held = {"sharded": 0.0, "replicated": 0.0}
    comm = dict.fromkeys(("x/y", "z", "dp", "pp"), 0.0)
    y_part = 0.0  # of comm["x/y"], what goes over y: the cost model puts x and y on their own links
    for layer in shape.layers:
        share = 1 / blocks if layer.in_block else 1 / ends
        spec = linear_weight_spec((layer.out_features, layer.in_features), tp)
        if not divisible(spec.full_shape, spec.dim_axes, tp):
            held["replicated"] += (layer.out_features * layer.in_features + layer.bias) * share
            continue
        held["replicated"] += layer.bias / y * share  # cut over y, replicated over dp and z
        block = layer.out_features * layer.in_features / (x * y)
        held["sharded"] += block / z * share
        comm["z"] += 2 * (z - 1) / z * block * microbatches * share
        t = tokens * share
        over_x = t * (2 * (x - 1) / x * layer.out_features / y + (x - 1) / x * layer.in_features)
        over_y = t * ((y - 1) / y * layer.out_features + 2 * (y - 1) / y * layer.in_features / x)
        comm["x/y"] += over_x + over_y
        y_part += over_y
    held["replicated"] += shape.other_in_blocks / blocks + (shape.other_params - shape.other_in_blocks) / ends
    comm["dp"] = 2 * (dp - 1) / dp * held["sharded"] + 2 * (dp * z - 1) / (dp * z) * held["replicated"]
    if pp > 1 and shape.hidden:  # a middle stage sends both ways, an end stage one way
        comm["pp"] = (2 if stage is None or 0 < stage < pp - 1 else 1) * tokens * shape.hidden
    params = held["sharded"] + held["replicated"]
    act = 0.0
    if shape.hidden and shape.heads:
        s, h, a = shape.seq_len, shape.hidden, shape.heads
        # 1F1B: stage s holds pp - s microbatches at its peak (the first stage pp)
        in_flight = min(pp - (stage or 0), microbatches) / microbatches
        act = shape.blocks / blocks * tokens * in_flight * h * (68 + 10 * a * s / h)
    return {"params": params, "weights": 4 * params, "grads": 4 * params, "adamw": 8 * params,
            "activations": act, **{f"comm {k}": 4 * v for k, v in comm.items()}, "y part of x/y": 4 * y_part}


def candidate_grids(world: int, blocks: int) -> list[dict[str, int]]:
    """Every pp x z x y x x with a product dividing ``world`` (dp takes the rest), pp <= blocks."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    grids = []
    for pp, z, y, x in itertools.product(divisors, repeat=4):
        if world % (pp * z * y * x) == 0 and pp <= max(blocks, 1):
            grids.append(resolve_sizes(world, pp=pp, x=x, y=y, z=z))
    return grids


def build_model(args: argparse.Namespace) -> nn.Module:
    """The model ``args`` name (``--factory``, a family or a config), built in the caller's
    context: ``plan`` builds it on meta, ``plan --dry-run`` on meta under ``auto_parallelize``."""
    if args.factory:
        made = models.load_factory(args.factory)()
        return made[0] if isinstance(made, tuple) else made
    if args.model in models.FAMILIES:
        return models.build(args.model, tiny=False)
    if not os.path.exists(args.model):
        raise ValueError(f"--model {args.model!r} is neither a family ({', '.join(models.FAMILIES)}) nor a "
                         "Hugging Face config.json or a folder holding one")
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(args.model)
    names = [n for n in getattr(config, "architectures", None) or () if hasattr(tf, n)]
    return getattr(tf, names[0])(config) if names else tf.AutoModelForCausalLM.from_config(config)


def main(args: argparse.Namespace) -> int:
    """Print the table for ``args`` (``args.grid``: one grid, or empty to rank them all)."""
    grid = args.grid
    with torch.device("meta"):
        model = build_model(args)
    shape = shape_of(model, args.seq_len)
    grids = [resolve_sizes(args.world, **grid)] if grid else candidate_grids(args.world, shape.blocks)
    if args.hardware or args.calibrate:
        from . import cost

        hw = cost.calibrate(args.world) if args.calibrate else cost.load_hardware(args.hardware)
        print(f"{args.factory or args.model}: {shape.blocks} blocks; global batch {args.global_batch} x "
              f"{shape.seq_len} tokens; fp32 AdamW, {args.schedule}")
        ranked = cost.rank_grids(shape, args.world, args.global_batch, hw, args.microbatches, args.schedule, grids)
        cost.print_ranking(ranked, hw, args.top if not grid else len(ranked))
        return 0
    rows = []
    for sizes in grids:
        fig = predict(shape, sizes, args.global_batch, args.microbatches or sizes["pp"])
        memory = fig["weights"] + fig["grads"] + fig["adamw"] + fig["activations"]
        comm = sum(v for k, v in fig.items() if k.startswith("comm"))
        rows.append((memory, comm, sizes, fig))
    rows.sort(key=lambda r: (r[0], r[1]))
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.factory or args.model}: {total / 1e6:,.1f}M parameters, {shape.blocks} blocks, "
          f"{len(shape.layers)} shardable weights; global batch {args.global_batch} x {shape.seq_len} tokens; "
          f"fp32 AdamW; per rank, busiest stage, GiB")
    print(f"{'pp dp  z  y  x':>14} {'params(M)':>9} {'weights':>8} {'grads':>7} {'adamw':>7} {'activ.':>7} "
          f"{'memory':>8} {'comm x/y':>8} {'z':>7} {'dp':>7} {'pp':>7} {'comm':>8}")
    for memory, comm, sizes, fig in rows[:args.top if not grid else None]:
        g = " ".join(f"{sizes[a]:>2}" for a in ("pp", "dp", "z", "y", "x"))
        print(f"{g:>14} {fig['params'] / 1e6:9.1f} " + " ".join(
            f"{fig[k] / GIB:{w}.3f}" for k, w in (("weights", 8), ("grads", 7), ("adamw", 7), ("activations", 7)))
            + f" {memory / GIB:8.3f} " + " ".join(
            f"{fig[k] / GIB:{w}.3f}" for k, w in (("comm x/y", 8), ("comm z", 7), ("comm dp", 7), ("comm pp", 7)))
            + f" {comm / GIB:8.3f}")
    if not grid and len(rows) > args.top:
        print(f"... {len(rows) - args.top} more grids (--top)")
    return 0
