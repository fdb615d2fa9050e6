"""``autopar.from_pretrained``: a Hugging Face model from a local folder, each rank reading only
its own slices of the safetensors files.

Why not ``Model.from_pretrained`` inside ``auto_parallelize``: that works (the weights are loaded
at full size, then sliced when the block exits) but every rank then holds, for a moment, the
whole model. Here the model is built with its *parameters* on the meta device (buffers stay
real, so rotary frequencies and position ids are computed as usual), ``auto_parallelize`` shards
the meta parameters, and each rank allocates only its pieces and fills them with
``safe_open(...).get_slice``: the (y, x) block of each weight, and with depth (z) only the rows
that hold its 1/z piece. Nothing of full size is ever allocated, so a model that does not fit
one host loads on a grid where its shards do.

Names follow ``transformers``: the checkpoint may lack weights tied to another (read through the
tie), may have been saved by the base model or by a model with a head (``base_model_prefix``
added or dropped), and weights it lacks entirely (a new classification head) are initialised by
the model's own ``_init_weights`` at full size, one module at a time, then sliced, and logged.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from ..runtime.state import current_grid
from .hf import WEIGHTS, WEIGHTS_INDEX

log = logging.getLogger("autopar")


@dataclass
class LoadReport:
    """What a rank read: bytes of its slices against the bytes of the whole files."""

    read_bytes: int = 0
    file_bytes: int = 0
    initialised: list[str] = field(default_factory=list)  # absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)   # in the checkpoint, not in the model


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device as it is registered (layer by
    layer, so at most one layer is ever allocated at full size); buffers are left alone."""
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            param = meta
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _files(folder: str) -> dict[str, str]:
    """Checkpoint tensor name -> file, from the index or the single weights file."""
    index = os.path.join(folder, WEIGHTS_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(folder, WEIGHTS)
    if not os.path.exists(single):
        raise FileNotFoundError(f"{folder} has neither {WEIGHTS} nor {WEIGHTS_INDEX}; autopar.from_pretrained "
                                "reads safetensors weights (save with safe_serialization=True)")
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def _read_piece(view: Any, spec: Any, coords: dict[str, int]) -> torch.Tensor:
    """This rank's piece of one sharded weight, reading only the rows that contain it."""
    slices = spec.block_slices(coords)
    if not spec.depth:
        return view[slices]
    k, block = spec.local_numel, spec.block_shape
    start, stop = coords["z"] * k, min((coords["z"] + 1) * k, spec.block_numel)
    piece = torch.zeros(k, dtype=_DTYPES[view.get_dtype()])
    if stop <= start:
        return piece
    width = block[-1] if len(block) == 2 else spec.block_numel
    first, last = start // width, -(-stop // width)
    if len(block) == 2:
        rows = slices[0]
        row0 = rows.start or 0
        part = view[row0 + first:row0 + last, slices[1]].reshape(-1)
    else:
        part = view[slices].reshape(-1)[first * width:last * width]
    piece[:stop - start] = part[start - first * width:stop - first * width]
    return piece


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _candidates(name: str, prefix: str) -> list[str]:
    """Checkpoint names a model tensor may have been saved under."""
    out = [name]
    if prefix and name.startswith(prefix + "."):
        out.append(name[len(prefix) + 1:])   # saved by the base model
    elif prefix:
        out.append(f"{prefix}.{name}")       # saved by a model with a head
    return out


def load_pretrained_(model: nn.Module, folder: str | os.PathLike) -> LoadReport:
    """Fill ``model``'s parameters and persistent buffers (already allocated, possibly sharded)
    from the safetensors files in ``folder``; each rank reads only its slices."""
    folder = os.fspath(folder)
    grid = current_grid()
    where = _files(folder)
    report = LoadReport(file_bytes=sum(os.path.getsize(f) for f in set(where.values())))
    prefix = getattr(model, "base_model_prefix", "")
    tensors: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        tensors.setdefault(id(t), ([], t))[0].append(name)
    persistent = {n for n, _ in model.state_dict(keep_vars=True).items()}
    used: set[str] = set()
    missing: list[tuple[str, torch.Tensor]] = []
    handles: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for names, t in tensors.values():
            key = next((c for n in names for c in _candidates(n, prefix) if c in where), None)
            if key is None:
                if isinstance(t, nn.Parameter) or any(n in persistent for n in names):
                    missing.append((names[0], t))
                continue
            if where[key] not in handles:
                handles[where[key]] = stack.enter_context(safe_open(where[key], framework="pt"))
            view = handles[where[key]].get_slice(key)
            spec = getattr(t, "_autopar_spec", None)
            if spec is not None:
                if tuple(view.get_shape()) != spec.full_shape:
                    raise ValueError(f"{key}: the checkpoint has shape {tuple(view.get_shape())}, the model "
                                     f"{spec.full_shape}")
                piece = _read_piece(view, spec, grid.coords)
            else:
                piece = view[:]
                if piece.shape != t.shape:
                    raise ValueError(f"{key}: the checkpoint has shape {tuple(piece.shape)}, the model {tuple(t.shape)}")
            report.read_bytes += piece.numel() * piece.element_size()
            with torch.no_grad():
                t.copy_(piece.reshape(t.shape))
            used.add(key)
    report.unexpected = sorted(set(where) - used)
    report.initialised = _initialise_missing(model, missing)
    return report


def _initialise_missing(model: nn.Module, missing: list[tuple[str, torch.Tensor]]) -> list[str]:
    """The model's own ``_init_weights`` on each module that owns a missing weight, at full size
    (the same draw on every rank: the RNG is seeded alike), then sliced into the local pieces."""
    if not missing:
        return []
    init = getattr(model, "_init_weights", None)
    if init is None:
        raise ValueError(f"the checkpoint lacks {[n for n, _ in missing]} and the model has no _init_weights")
    grid = current_grid()
    owners = {id(t): n for n, t in missing}
    for module in model.modules():
        mine = {k: p for k, p in module._parameters.items() if p is not None and id(p) in owners}
        if not mine:
            continue
        full = {k: nn.Parameter(torch.empty(p._autopar_spec.full_shape if getattr(p, "_autopar_spec", None)
                                            else p.shape, dtype=p.dtype)) for k, p in module._parameters.items()
                if p is not None}
        saved = dict(module._parameters)
        module._parameters.update(full)
        try:
            init(module)
        finally:
            module._parameters.update(saved)
        with torch.no_grad():
            for k, p in mine.items():
                spec = getattr(p, "_autopar_spec", None)
                p.copy_(spec.shard(full[k].data, grid.coords) if spec is not None else full[k].data)
    return sorted(owners.values())


def from_pretrained(model_class: Any, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    strict: bool = False, min_numel: int = 0) -> nn.Module:
    """``model_class`` (a ``transformers`` model class, e.g. ``LlamaForCausalLM``) from the local
    ``folder``, built 3D-parallel over the current grid with each rank reading only its slices.
    ``strict`` and ``min_numel`` are ``auto_parallelize``'s. Weights the checkpoint lacks are
    initialised by the model's ``_init_weights`` and logged, as ``transformers`` does."""
    from ..intra_layer import auto_parallelize  # the checkpoint package depends on runtime only

    grid = current_grid()
    config = model_class.config_class.from_pretrained(os.fspath(folder), local_files_only=True)
    with _parameters_on_meta(), auto_parallelize(strict=strict, min_numel=min_numel):
        model = model_class(config)
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():  # allocate the local pieces, keeping ties and tags
        for name, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in fresh:
                fresh[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype or p.dtype, device="cpu"), p.requires_grad)
                fresh[id(p)].__dict__.update(p.__dict__)
            module._parameters[name] = fresh[id(p)]
    report = load_pretrained_(model, folder)
    model.to(grid.device)
    if grid.rank == 0:
        log.info("from_pretrained %s: rank 0 read %.2f MiB of %.2f MiB%s%s", os.fspath(folder),
                 report.read_bytes / 2**20, report.file_bytes / 2**20,
                 f"; initialised (absent from the checkpoint): {report.initialised}" if report.initialised else "",
                 f"; unused checkpoint tensors: {report.unexpected}" if report.unexpected else "")
    model._autopar_load_report = report
    return model
