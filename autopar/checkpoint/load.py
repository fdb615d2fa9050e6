"""``load_checkpoint``: reshard on load, under any grid, reading only what this rank needs.

Loading moves no tensor data between ranks: each rank works out the region of every tensor it
holds under the *current* grid (``local``), intersects it with the stored pieces (``regions``)
and reads just those ranges from the files. A load is all or nothing: everything is read and
verified (completion marker, names inside the folder, model names and shapes, presence and size
of every file this rank needs, safetensors headers, the checksum of every chunk read and of the
RNG and ``extra`` files) into host memory first, the ranks agree, and only then is anything
applied. Errors are agreed on by all ranks, so a problem seen by one rank is raised on every
rank, and a caller that catches it still holds its untouched state.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .local import OptimizerParam, local_region, model_of, model_tensors, optimizer_params, serial_names
from .ranks import Ranks
from .regions import Region, fill, full_region, full_shape, overlaps
from .save import wait_for_pending
from .owned import read_index, resolve
from .storage import CheckpointError, PieceFiles, load_object

IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")
"""param_group entries that pick *how* the optimizer runs on this machine, not what it computes:
kept from the live optimizer rather than restored (a CPU-offloaded save may have fused=True)."""


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))


class _Reader:
    """Fills this rank's tensors from the stored pieces that overlap them."""

    def __init__(self, root: str, index: dict[str, Any]) -> None:
        self.index = index
        self.files = PieceFiles(root, index["files"])

    def pieces(self, key: str) -> list[tuple[dict[str, Any], Region]]:
        return [(p, Region.from_json(p["region"])) for p in self.index["tensors"][key]["pieces"]]

    def needed_files(self, targets: list[tuple[str, Region]]) -> set[str]:
        return {p["file"] for key, region in targets for p, r in self.pieces(key)
                if overlaps(region, r)}

    def read(self, out: torch.Tensor, key: str, region: Region) -> None:
        copied = 0
        for p, r in self.pieces(key):
            copied += fill(out, region, r, lambda a, b, p=p: self.files.read(p["file"], p["key"], p["crc"], a, b))
        if copied != region.numel:
            raise CheckpointError(f"incomplete checkpoint: {key} has {copied} of the {region.numel} elements "
                                  "this rank needs")


def _check_model(index: dict[str, Any], model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    stored = {k.removeprefix("model/") for k in index["tensors"] if k.startswith("model/")}
    expected = set(serial_names(model))
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint is of another model: {len(missing)} tensor(s) missing "
                              f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        shape = tuple(index["tensors"][f"model/{name}"]["shape"])
        if shape != full_shape(t):
            raise CheckpointError(f"the checkpoint is of another model: {name} has shape {list(shape)} "
                                  f"there, {list(full_shape(t))} here")


def _state_keys(index: dict[str, Any]) -> dict[str, list[str]]:
    """Stored optimizer state per parameter name: ``{name: ["exp_avg", "step", ...]}``."""
    by_name: dict[str, list[str]] = {}
    for key in [*index["tensors"], *index["values"]]:
        if key.startswith("optim/"):
            name, state_key = key[len("optim/"):].rsplit("/", 1)
            by_name.setdefault(name, []).append(state_key)
    return by_name


def _optimizer_targets(index: dict[str, Any], ops: list[OptimizerParam]) -> list[tuple[str, Region]]:
    keys = _state_keys(index)
    return [(f"optim/{seg.name}/{k}", seg.region) for op in ops for seg in op.segments
            for k in keys.get(seg.name, []) if f"optim/{seg.name}/{k}" in index["tensors"]]


def _optimizer_state(reader: _Reader, ops: list[OptimizerParam]) -> dict[int, dict[str, Any]]:
    by_name = _state_keys(reader.index)
    state = {}
    for i, op in enumerate(ops):
        entry: dict[str, Any] = {}
        for state_key in by_name.get(op.segments[0].name, []) if op.segments else []:
            key = f"optim/{op.segments[0].name}/{state_key}"
            if key in reader.index["values"]:
                entry[state_key] = reader.index["values"][key]
                continue
            meta = reader.index["tensors"][key]
            if not meta["shape"]:
                value = torch.zeros(1, dtype=_dtype(meta["dtype"]))
                reader.read(value, key, full_region(()))
                entry[state_key] = value.view(())
                continue
            flat = torch.zeros(op.param.numel(), dtype=_dtype(meta["dtype"]))
            for seg in op.segments:
                reader.read(flat[seg.start:seg.start + seg.region.numel], f"optim/{seg.name}/{state_key}", seg.region)
            entry[state_key] = flat.view(op.param.shape)
        if entry:
            state[i] = entry
    return state


def _optimizer_dict(engine: Any, reader: _Reader, coords: Mapping[str, int]) -> dict[str, Any]:
    """The ``load_state_dict`` argument for the live optimizer, read and checked in full."""
    optimizer = engine.optimizer
    saved = reader.index["param_groups"]
    live = optimizer.state_dict()["param_groups"]
    if saved is not None and len(saved) != len(live):
        raise CheckpointError(f"the checkpoint's optimizer has {len(saved)} parameter group(s), this one {len(live)}")
    ops = optimizer_params(engine, coords)
    state = _optimizer_state(reader, ops) if saved is not None else {}
    groups = []
    for now, then in zip(live, saved or live):
        group = dict(now)
        for k, v in then.items():
            if k not in IMPLEMENTATION_KEYS and k != "params":
                group[k] = tuple(v) if isinstance(now.get(k), tuple) else v
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _object(root: str, index: dict[str, Any], name: str) -> Any:
    """A pickled file of the checkpoint, checked against the index's size and CRC32 (checkpoints
    written before ``objects`` existed have none to check)."""
    objects = index.get("objects")
    if objects is not None and name not in objects:
        raise CheckpointError(f"incomplete checkpoint {root}: {name} is not listed in its index")
    return load_object(os.path.join(root, name), None if objects is None else objects[name])


@dataclass
class _Staged:
    """Everything a load changes, read and verified in full before any of it is applied."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]]  # (live tensor, its loaded value)
    optimizer: dict[str, Any] | None                  # for optimizer.load_state_dict, or None
    deferred: _Reader | None                          # optimizer state read by the first step
    step: int
    rng: dict[str, Any]
    extra: dict[str, Any]


def _stage(engine: Any, path: str, ranks: Ranks) -> _Staged:
    model = model_of(engine)
    root = resolve(path)
    index = read_index(root)
    tensors = model_tensors(model)
    _check_model(index, model, tensors)
    reader = _Reader(root, index)
    regions = {name: local_region(t, ranks.coords) for name, t in tensors.items()}
    # The first forward may still change which piece of each weight this rank holds (the
    # pipeline split, chained layers): optimizer state waits for it (``on_optimizer``).
    optimizer = getattr(engine, "optimizer", None) if getattr(engine, "layout_final", True) else None
    deferred = optimizer is None and hasattr(engine, "optimizer")
    targets = [(f"model/{n}", r) for n, r in regions.items()]
    if optimizer is not None:
        targets += _optimizer_targets(index, optimizer_params(engine, ranks.coords))
    elif deferred:
        # Verified now against this rank's current regions, which contain what it will hold
        # after a pipeline split, so a damaged file fails this load rather than the first step.
        keys = _state_keys(index)
        targets += [(f"optim/{n}/{k}", regions[n] if index["tensors"][f"optim/{n}/{k}"]["shape"] else full_region(()))
                    for n in tensors for k in keys.get(n, []) if f"optim/{n}/{k}" in index["tensors"]]
    staged = []
    with reader.files, torch.no_grad():
        reader.files.check(reader.needed_files(targets))
        for name, t in tensors.items():
            out = torch.zeros(t.numel(), dtype=t.dtype)
            reader.read(out, f"model/{name}", regions[name])
            staged.append((t, out.view(t.shape)))
        state = _optimizer_dict(engine, reader, ranks.coords) if optimizer is not None else None
        for key, region in targets if deferred else []:
            if key.startswith("optim/"):
                reader.read(torch.zeros(region.numel, dtype=_dtype(index["tensors"][key]["dtype"])), key, region)
    same_grid = index["grid"] == ranks.sizes
    rng = _object(root, index, f"rng-{ranks.rank if same_grid else 0:05d}.pt")
    extra = _object(root, index, "extra.pt")
    return _Staged(staged, state, _Reader(root, index) if deferred else None, index["step"], rng, extra)


def load_checkpoint(engine: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint saved under any grid into ``engine`` (or a plain ``nn.Module``) on the
    current grid; returns the ``extra`` dict it was saved with. Collective: call on every rank.
    Each rank reads only the stored ranges that overlap what it holds.

    All or nothing: every rank first reads and verifies everything it will change (model and
    optimizer tensors with their checksums, RNG states, ``extra``) into host memory, and the ranks
    agree; only then is anything applied. A failed load raises ``CheckpointError`` on every rank
    and leaves the weights, the optimizer, the step count and the RNGs as they were.

    Before the first step the optimizer may not exist yet (pp > 1), or the first forward may
    still re-lay out weights (``Engine.layout_final``): its state is then verified now and applied
    by the first step, after its forward, so leave the checkpoint in place until then."""
    wait_for_pending(engine)
    ranks, path = Ranks(), os.fspath(path)
    staged, error = None, None
    try:
        staged = _stage(engine, path, ranks)
    except Exception as e:  # noqa: BLE001 - agreed on below
        error = e
    ranks.agree(error)
    try:
        with torch.no_grad():
            for live, value in staged.tensors:
                live.copy_(value)
        if staged.optimizer is not None:
            # Hooks of offload steppers run here: state goes back to the host, master weights are re-read.
            engine.optimizer.load_state_dict(staged.optimizer)
        if staged.deferred is not None:
            engine.on_optimizer.append(lambda reader=staged.deferred: _load_optimizer_from(engine, reader, ranks))
        if hasattr(engine, "step_count"):
            engine.step_count = staged.step
        _set_rng_state(staged.rng)
    except Exception as e:  # noqa: BLE001 - agreed on below
        error = e
    ranks.agree(error)
    return staged.extra


def _load_optimizer_from(engine: Any, reader: _Reader, ranks: Ranks) -> None:
    """Deferred optimizer load, run by the engine's first step on every rank (``on_optimizer``):
    read in full and agreed on before it is applied."""
    error, state = None, None
    try:
        with reader.files, torch.no_grad():
            state = _optimizer_dict(engine, reader, ranks.coords)
    except Exception as e:  # noqa: BLE001 - agreed on below
        error = e
    ranks.agree(error)
    engine.optimizer.load_state_dict(state)
