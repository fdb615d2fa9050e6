"""``save_pretrained``: a consolidated Hugging Face folder from a model sharded over any grid.

Memory: the folder is streamed file by file. All ranks walk the same list of files
(``max_shard_size`` each) in the serial order; for each one the ranks that are designated writers
(``local.writes``: one copy of every distinct piece) of its tensors send those pieces to the rank
that writes the file, which assembles them (``regions.fill``) and writes it. The writer holds at
most one file's tensors and their incoming pieces; no rank ever holds the whole model, and files
are spread round-robin over the ranks so that only one rank writes each file.

Transport: the pieces of one file travel as one batch of non-blocking sends and receives on the
checkpoint gloo group (``ranks.checkpoint_group``), host memory to host memory, posted in the same
(tensor, holder) order on both sides. The writer needs the bytes on the host anyway; this avoids a
blocking NCCL send per piece (and an NCCL communicator per holder-writer pair), and the group's
long timeout lets a slow file system take its time without the collective timeout ending the job.

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

from .local import local_region, model_of, model_tensors, serial_names, writes
from .ranks import Ranks
from .regions import Region, fill, full_region, full_shape
from .save import wait_for_pending

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
    wait_for_pending(engine)  # an asynchronous save may still be using the checkpoint group
    ranks, path = Ranks(), os.fspath(path)
    model = model_of(engine)
    whole_on_every_stage = getattr(engine, "pipeline", None) is not None and getattr(engine, "optimizer", None) is None
    mine = {n: t for n, t in model_tensors(model).items() if writes(t, ranks.coords, whole_on_every_stage)}
    offer = {n: (list(full_shape(t)), str(t.dtype).removeprefix("torch."), local_region(t, ranks.coords).to_json())
             for n, t in mine.items()}
    offers = [offer] if ranks.world == 1 else [None] * ranks.world
    if ranks.world > 1:
        dist.all_gather_object(offers, offer, group=ranks.group)
    meta = {n: (s, d) for o in offers for n, (s, d, _) in o.items()}
    order = [n for n in serial_names(model) if n in meta]
    files = _plan(order, meta, _bytes(max_shard_size))
    names = [WEIGHTS] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    if ranks.rank == 0:
        os.makedirs(path, exist_ok=True)
        _write_configs(model, path)
    if ranks.world > 1:
        dist.barrier(group=ranks.group)
    for i, (fname, tensors) in enumerate(zip(names, files)):
        writer = i % ranks.world
        out = _assemble_file(tensors, meta, offers, mine, writer, ranks)
        if ranks.rank == writer:
            save_file(out, os.path.join(path, fname), metadata={"format": "pt"})
    if ranks.rank == 0 and len(files) > 1:
        total = sum(torch.Size(meta[n][0]).numel() * torch.empty((), dtype=getattr(torch, meta[n][1])).element_size()
                    for n in order)
        weight_map = {n: fname for fname, tensors in zip(names, files) for n in tensors}
        with open(os.path.join(path, WEIGHTS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if ranks.world > 1:
        dist.barrier(group=ranks.group)


def _piece(t: torch.Tensor, region_json: Any) -> torch.Tensor:
    """This rank's stored elements of ``t`` (its padded tail cut off), on the host."""
    return t.detach().reshape(-1)[:Region.from_json(region_json).numel].to("cpu").contiguous()


def _assemble_file(tensors: list[str], meta: dict[str, tuple[list[int], str]], offers: list[dict[str, Any]],
                   mine: dict[str, torch.Tensor], writer: int, ranks: Ranks) -> dict[str, torch.Tensor]:
    """The full tensors of one file on ``writer`` (an empty dict elsewhere): every holder posts
    its pieces of them as sends in tensor order, the writer the matching receives in (tensor,
    holder) order, then each rank waits for all of its own."""
    holders = {name: [r for r, o in enumerate(offers) if name in o] for name in tensors}
    if ranks.rank != writer:
        sends = [_piece(mine[name], offers[ranks.rank][name][2]) for name in tensors if ranks.rank in holders[name]]
        for work in [dist.isend(t, dst=writer, group=ranks.group) for t in sends]:
            work.wait()
        return {}
    incoming: list[tuple[str, int, torch.Tensor]] = []
    works = []
    for name in tensors:
        for r in holders[name]:
            if r == ranks.rank:
                incoming.append((name, r, _piece(mine[name], offers[r][name][2])))
                continue
            buffer = torch.empty(Region.from_json(offers[r][name][2]).numel, dtype=getattr(torch, meta[name][1]))
            works.append(dist.irecv(buffer, src=r, group=ranks.group))
            incoming.append((name, r, buffer))
    for work in works:
        work.wait()
    out = {name: torch.empty(tuple(meta[name][0]), dtype=getattr(torch, meta[name][1])) for name in tensors}
    for name, r, piece in incoming:
        fill(out[name].view(-1), full_region(tuple(meta[name][0])), Region.from_json(offers[r][name][2]),
             lambda a, b, piece=piece: piece[a:b])
    return out


def _write_configs(model: torch.nn.Module, path: str) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(path)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(path)
