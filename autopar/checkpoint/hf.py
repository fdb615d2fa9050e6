"""``save_pretrained``: a consolidated Hugging Face folder from a model sharded over any grid.

Memory: the folder is streamed tensor by tensor. All ranks walk the same list of tensors in the
serial order; for each one the ranks that are its designated writers (``local.writes``: one copy
of every distinct piece) send their piece point to point to the rank that writes the file the
tensor belongs to, which assembles it (``regions.fill``) and keeps at most one file's worth of
tensors (``max_shard_size``) before writing it. No rank ever holds the whole model, and files are
spread round-robin over the ranks so that only one rank writes each file.

Tied weights (GPT-2's ``lm_head`` = ``wte``) are written once under the first serial name, which
is what ``transformers``' own ``save_pretrained`` does; ``from_pretrained`` ties them back.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..runtime.state import current_grid, is_initialized
from .local import local_region, model_of, model_tensors, serial_names, writes
from .regions import Region, fill, full_region, full_shape
from .ranks import Ranks

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _bytes(size: int | str) -> int:
    """``max_shard_size`` as ``transformers`` spells it: an int or e.g. "5GB", "500MiB"."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * _UNITS[unit])
    raise ValueError(f"max_shard_size {size!r}: expected bytes as an int or a string like '5GB' or '500MiB'")


def _plan(order: list[str], meta: dict[str, tuple[list[int], str]], limit: int) -> list[list[str]]:
    files: list[list[str]] = [[]]
    used = 0
    for name in order:
        shape, dtype = meta[name]
        size = torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        if files[-1] and used + size > limit:
            files.append([])
            used = 0
        files[-1].append(name)
        used += size
    return files


def save_pretrained(engine: Any, path: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
    """Write ``config.json`` (and ``generation_config.json``) plus safetensors weights, split into
    ``model-0000i-of-0000n.safetensors`` with an index when larger than ``max_shard_size``, that
    ``transformers.AutoModel*.from_pretrained(path)`` loads in one process. Collective."""
    ranks, path = Ranks(), os.fspath(path)
    model = model_of(engine)
    device = current_grid().device if is_initialized() else torch.device("cpu")
    whole_on_every_stage = getattr(engine, "pipeline", None) is not None and getattr(engine, "optimizer", None) is None
    mine = {n: t for n, t in model_tensors(model).items() if writes(t, ranks.coords, whole_on_every_stage)}
    offer = {n: (list(full_shape(t)), str(t.dtype).removeprefix("torch."), local_region(t, ranks.coords).to_json())
             for n, t in mine.items()}
    offers = [offer] if ranks.world == 1 else [None] * ranks.world
    if ranks.world > 1:
        dist.all_gather_object(offers, offer)
    meta = {n: (s, d) for o in offers for n, (s, d, _) in o.items()}
    order = [n for n in serial_names(model) if n in meta]
    files = _plan(order, meta, _bytes(max_shard_size))
    names = [WEIGHTS] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    if ranks.rank == 0:
        os.makedirs(path, exist_ok=True)
        _write_configs(model, path)
    if ranks.world > 1:
        dist.barrier()
    for i, (fname, tensors) in enumerate(zip(names, files)):
        writer = i % ranks.world
        out: dict[str, torch.Tensor] = {}
        for name in tensors:
            full = _assemble(name, meta[name], offers, mine, writer, ranks.rank, device)
            if full is not None:
                out[name] = full
        if ranks.rank == writer:
            save_file(out, os.path.join(path, fname), metadata={"format": "pt"})
    if ranks.rank == 0 and len(files) > 1:
        total = sum(torch.Size(meta[n][0]).numel() * torch.empty((), dtype=getattr(torch, meta[n][1])).element_size()
                    for n in order)
        weight_map = {n: fname for fname, tensors in zip(names, files) for n in tensors}
        with open(os.path.join(path, WEIGHTS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if ranks.world > 1:
        dist.barrier()


def _assemble(name: str, meta: tuple[list[int], str], offers: list[dict[str, Any]], mine: dict[str, torch.Tensor],
              writer: int, rank: int, device: torch.device) -> torch.Tensor | None:
    """The full tensor ``name`` on ``writer`` (None elsewhere): each rank holding a piece of it
    sends that piece there, in rank order."""
    shape, dtype = tuple(meta[0]), getattr(torch, meta[1])
    holders = [r for r, o in enumerate(offers) if name in o]
    if rank != writer:
        if rank in holders:
            t = mine[name]
            region = Region.from_json(offers[rank][name][2])
            dist.send(t.detach().reshape(-1)[:region.numel].contiguous(), dst=writer)
        return None
    full = torch.empty(shape, dtype=dtype).reshape(-1)
    target = full_region(shape)
    for r in holders:
        region = Region.from_json(offers[r][name][2])
        if r == rank:
            piece = mine[name].detach().reshape(-1)[:region.numel]
        else:
            piece = torch.empty(region.numel, dtype=dtype, device=device)
            dist.recv(piece, src=r)
        piece = piece.cpu()
        fill(full, target, region, lambda a, b, piece=piece: piece[a:b])
    return full.view(shape)


def _write_configs(model: torch.nn.Module, path: str) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(path)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(path)
