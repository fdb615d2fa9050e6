"""``save_checkpoint`` / ``load_checkpoint``: sharded writes, reshard on load under any grid.

Save: every rank snapshots the pieces it is the designated writer of (``local.writes``) to host
memory and writes them to its own file; rank 0 gathers the small piece lists, writes the index
last and swaps the directory into place (``storage``). Load needs no collective to move data:
each rank works out the region of every tensor it holds under the *current* grid, intersects
it with the stored pieces and reads just those ranges. Errors are agreed on by all ranks (one
tiny all-gather) so that a problem seen by one rank is raised on every rank instead of leaving
the others waiting in the next collective.
"""
from __future__ import annotations

import math
import os
import random
import uuid
from typing import Any, Mapping

import torch
import torch.distributed as dist

from ..runtime.state import current_grid, is_initialized
from .local import (OptimizerParam, serial_names, local_region, model_of, model_tensors, optimizer_params,
                    writes)
from .regions import Region, fill, full_region, full_shape
from .storage import (FORMAT, CheckpointError, PieceFiles, load_object, read_index, remove_stale, resolve,
                      save_object, staging_dir, write_index, write_pieces, commit)

IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")
"""param_group entries that pick *how* the optimizer runs on this machine, not what it computes:
kept from the live optimizer rather than restored (a CPU-offloaded save may have fused=True)."""


class Ranks:
    """This rank's place and the few object collectives a checkpoint needs; a plain process
    with no ``autopar.init`` is a world of one."""

    def __init__(self) -> None:
        if is_initialized():
            grid = current_grid()
            self.rank, self.world, self.sizes, self.coords = grid.rank, grid.world_size, dict(grid.sizes), grid.coords
        else:
            self.rank, self.world = 0, 1
            self.sizes = dict(pp=1, dp=1, z=1, y=1, x=1)
            self.coords = dict.fromkeys(self.sizes, 0)

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed, naming the failing ranks' errors."""
        mine = None if error is None else f"{type(error).__name__}: {error}"
        errors = [mine] if self.world == 1 else [None] * self.world
        if self.world > 1:
            dist.all_gather_object(errors, mine)
        failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
        if failed:
            raise CheckpointError("; ".join(failed)) from error


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store optimizer option {value!r} of type {type(value).__name__}")


# --- save ------------------------------------------------------------------------------------------
Piece = tuple[str, tuple[int, ...], torch.dtype, Region, torch.Tensor]  # key, full shape, dtype, region, data


def _model_pieces(engine: Any, coords: Mapping[str, int], replicated_over_pp: bool) -> list[Piece]:
    out = []
    for name, t in model_tensors(model_of(engine)).items():
        if writes(t, coords, replicated_over_pp):
            region = local_region(t, coords)
            out.append((f"model/{name}", full_shape(t), t.dtype, region, t.detach().reshape(-1)[:region.numel]))
    return out


def _optimizer_pieces(engine: Any, coords: Mapping[str, int], replicated_over_pp: bool
                      ) -> tuple[list[Piece], dict[str, Any]]:
    """Tensor state shaped like its parameter follows the parameter's segments; 0-d tensors
    (``step``) and plain values are per parameter and stored once per segment's name."""
    optimizer = engine.optimizer
    optimizer.state_dict()  # offload steppers finish their copies to the host in this hook
    pieces, values = [], {}
    for op in optimizer_params(engine, coords):
        if not writes(op.owner, coords, replicated_over_pp):
            continue
        for key, value in optimizer.state.get(op.param, {}).items():
            for seg in op.segments:
                name = f"optim/{seg.name}/{key}"
                if not isinstance(value, torch.Tensor):
                    values[name] = _jsonable(value)
                elif value.dim() == 0:
                    pieces.append((name, (), value.dtype, full_region(()), value.detach().reshape(1)))
                elif value.numel() == op.param.numel():
                    flat = value.detach().reshape(-1)[seg.start:seg.start + seg.region.numel]
                    pieces.append((name, seg.shape, value.dtype, seg.region, flat))
                else:
                    raise CheckpointError(f"optimizer state {key!r} of {seg.name} has shape {tuple(value.shape)}, "
                                          f"unlike its parameter {tuple(op.param.shape)}; it cannot be resharded")
    return pieces, values


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
    except ImportError:
        return state
    kind, keys, pos, has_gauss, gauss = numpy.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss)
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))


def _merge(metas: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    """Rank 0: one entry per stored tensor, duplicate pieces (0-d state written by several ZeRO
    shards) dropped, and a coverage check so a bug cannot produce a silently partial checkpoint."""
    tensors: dict[str, Any] = {}
    files, values = {}, {}
    for meta in metas:
        if meta["file"] is not None:
            files[meta["file"]] = meta["size"]
        values.update(meta["values"])
        for key, shape, dtype, region, tkey, crcs in meta["pieces"]:
            entry = tensors.setdefault(key, {"shape": shape, "dtype": dtype, "pieces": []})
            if all(p["region"] != region for p in entry["pieces"]):
                entry["pieces"].append({"file": meta["file"], "key": tkey, "region": region, "crc": crcs})
    for key, entry in tensors.items():
        covered = sum(Region.from_json(p["region"]).numel for p in entry["pieces"])
        if covered != math.prod(entry["shape"]):
            raise CheckpointError(f"internal error: the pieces of {key} cover {covered} of "
                                  f"{math.prod(entry['shape'])} elements")
    return tensors, files, values


def save_checkpoint(engine: Any, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None) -> None:
    """Save model, optimizer state, step count, RNG states and ``extra`` (e.g. the data loader
    position, a loss scaler's ``state_dict()``: tensors, numbers, strings, lists and dicts) to
    the directory ``path``, replacing a previous checkpoint there only once the new one is
    complete. Collective: call on every rank. ``engine`` may also be a plain ``nn.Module``."""
    ranks, path = Ranks(), os.fspath(path)
    coords = ranks.coords
    optimizer = getattr(engine, "optimizer", None)
    # A pipeline splits at its first step; before that every stage holds the whole model.
    whole_on_every_stage = getattr(engine, "pipeline", None) is not None and optimizer is None
    start = None
    if ranks.rank == 0:  # the staging directory exists before the other ranks learn its name
        try:
            remove_stale(path)
            start = (uuid.uuid4().hex[:12], None)
            os.makedirs(staging_dir(path, start[0]))
        except OSError as e:
            start = (None, f"{type(e).__name__}: {e}")
    tag, problem = ranks.broadcast(start)
    if problem is not None:
        raise CheckpointError(f"saving {path} failed, the previous checkpoint is untouched: rank 0: {problem}")
    tmp = staging_dir(path, tag)
    error, meta = None, None
    try:
        pieces = _model_pieces(engine, coords, whole_on_every_stage)
        values: dict[str, Any] = {}
        if optimizer is not None:
            opt_pieces, values = _optimizer_pieces(engine, coords, whole_on_every_stage)
            pieces += opt_pieces
        data = [p[4].to("cpu", copy=True) for p in pieces]
        file, size, crcs = None, 0, []
        if data:
            file = f"rank-{ranks.rank:05d}.safetensors"
            size, crcs = write_pieces(os.path.join(tmp, file), data)
        save_object(_rng_state(), os.path.join(tmp, f"rng-{ranks.rank:05d}.pt"))
        meta = {"file": file, "size": size, "values": values,
                "pieces": [(k, list(s), str(d).removeprefix("torch."), r.to_json(), str(i), c)
                           for i, ((k, s, d, r, _), c) in enumerate(zip(pieces, crcs))]}
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        error = e
    metas = ranks.gather((meta, None if error is None else f"{type(error).__name__}: {error}"))
    outcome = None
    if ranks.rank == 0:
        failed = [f"rank {r}: {e}" for r, (_, e) in enumerate(metas) if e is not None]
        try:
            if failed:
                raise CheckpointError("; ".join(failed))
            tensors, files, values = _merge([m for m, _ in metas])
            groups = None
            if optimizer is not None:
                groups = [{k: _jsonable(v) for k, v in g.items() if k != "params"}
                          for g in optimizer.state_dict()["param_groups"]]
            save_object(dict(extra or {}), os.path.join(tmp, "extra.pt"))
            write_index(tmp, {"format": FORMAT, "step": getattr(engine, "step_count", 0), "grid": ranks.sizes,
                              "param_groups": groups, "values": values, "files": files, "tensors": tensors})
            commit(tmp, path, tag)
        except Exception as e:  # noqa: BLE001
            outcome = f"{type(e).__name__}: {e}"
    outcome = ranks.broadcast(outcome)
    if outcome is not None:
        raise CheckpointError(f"saving {path} failed, the previous checkpoint is untouched: {outcome}") from error


# --- load ------------------------------------------------------------------------------------------
class _Reader:
    """Fills this rank's tensors from the stored pieces that overlap them."""

    def __init__(self, root: str, index: dict[str, Any]) -> None:
        self.index = index
        self.files = PieceFiles(root, index["files"])

    def pieces(self, key: str) -> list[tuple[dict[str, Any], Region]]:
        return [(p, Region.from_json(p["region"])) for p in self.index["tensors"][key]["pieces"]]

    def needed_files(self, targets: list[tuple[str, Region]]) -> set[str]:
        return {p["file"] for key, region in targets for p, r in self.pieces(key)
                if fill_overlaps(region, r)}

    def read(self, out: torch.Tensor, key: str, region: Region) -> None:
        copied = 0
        for p, r in self.pieces(key):
            copied += fill(out, region, r, lambda a, b, p=p: self.files.read(p["file"], p["key"], p["crc"], a, b))
        if copied != region.numel:
            raise CheckpointError(f"incomplete checkpoint: {key} has {copied} of the {region.numel} elements "
                                  "this rank needs")


def fill_overlaps(target: Region, piece: Region) -> bool:
    if not target.box:
        return True
    return all(max(a0, b0) < min(a1, b1) for (a0, a1), (b0, b1) in zip(target.box, piece.box))


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


def _optimizer_state(reader: _Reader, ops: list[OptimizerParam]) -> dict[int, dict[str, Any]]:
    by_name: dict[str, list[str]] = {}
    for key in reader.index["tensors"]:
        if key.startswith("optim/"):
            name, state_key = key[len("optim/"):].rsplit("/", 1)
            by_name.setdefault(name, []).append(state_key)
    for key in reader.index["values"]:
        name, state_key = key[len("optim/"):].rsplit("/", 1)
        by_name.setdefault(name, []).append(state_key)
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


def _load_optimizer(engine: Any, reader: _Reader, coords: Mapping[str, int]) -> None:
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
    # Hooks of offload steppers run here: state goes back to the host, master weights are re-read.
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_checkpoint(engine: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint saved under any grid into ``engine`` (or a plain ``nn.Module``) on the
    current grid; returns the ``extra`` dict it was saved with. Collective: call on every rank.
    Each rank reads only the stored ranges that overlap what it holds. With pp > 1 before the
    first step the optimizer does not exist yet: its state is read when the first step builds it,
    so leave the checkpoint in place until then."""
    ranks, path = Ranks(), os.fspath(path)
    model = model_of(engine)
    error, extra = None, {}
    try:
        root = resolve(path)
        index = read_index(root)
        tensors = model_tensors(model)
        _check_model(index, model, tensors)
        reader = _Reader(root, index)
        regions = {name: local_region(t, ranks.coords) for name, t in tensors.items()}
        optimizer = getattr(engine, "optimizer", None)
        targets = [(f"model/{n}", r) for n, r in regions.items()]
        with reader.files, torch.no_grad():
            reader.files.check(reader.needed_files(targets))
            for name, t in tensors.items():
                out = torch.zeros(t.numel(), dtype=t.dtype)
                reader.read(out, f"model/{name}", regions[name])
                t.copy_(out.view(t.shape))
            if optimizer is not None:
                _load_optimizer(engine, reader, ranks.coords)
        if optimizer is None and hasattr(engine, "optimizer"):
            engine.on_optimizer.append(lambda: _load_optimizer_from(engine, _Reader(root, index), ranks.coords))
        if hasattr(engine, "step_count"):
            engine.step_count = index["step"]
        same_grid = index["grid"] == ranks.sizes
        _set_rng_state(load_object(os.path.join(root, f"rng-{ranks.rank if same_grid else 0:05d}.pt")))
        extra = load_object(os.path.join(root, "extra.pt"))
    except Exception as e:  # noqa: BLE001 - agreed on below
        error = e
    ranks.agree(error)
    return extra


def _load_optimizer_from(engine: Any, reader: _Reader, coords: Mapping[str, int]) -> None:
    """Deferred optimizer load of a pipeline engine, run by its first step (``on_optimizer``)."""
    with reader.files, torch.no_grad():
        _load_optimizer(engine, reader, coords)
