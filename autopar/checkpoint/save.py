"""``save_checkpoint``: every rank writes only the pieces it is the designated writer of.

A save has two halves. The *snapshot*, always on the caller's thread: copy this rank's pieces
(``local.writes`` picks one copy of every distinct piece) and its RNG states to host memory, so
training may change the weights right after. The *write*: each rank writes its own safetensors
file, rank 0 gathers the small piece lists, writes the index last and swaps the directory into
place (``storage``). With ``async_save=True`` the write runs on a background thread, overlapping
the next training steps; its collectives use the checkpoint gloo group (``ranks``). The next save or load
waits for it, so at most one is in flight.
"""
from __future__ import annotations

import copy
import math
import os
import random
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .local import local_region, model_of, model_tensors, optimizer_params, writes
from .ranks import Ranks
from .regions import Region, full_region, full_shape
from .owned import check_target, remove_stale, write_marker
from .storage import FORMAT, CheckpointError, commit, save_object, staging_dir, write_index, write_pieces

Piece = tuple[str, tuple[int, ...], torch.dtype, Region, torch.Tensor]  # key, full shape, dtype, region, data


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store optimizer value {value!r} of type {type(value).__name__}")


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
    state["numpy"] = (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss)  # loadable with weights_only
    return state


@dataclass
class _Snapshot:
    """Everything a rank writes, in host memory."""

    pieces: list[Piece]
    values: dict[str, Any]
    rng: dict[str, Any]
    step: int
    param_groups: list[dict[str, Any]] | None
    extra: dict[str, Any]


def _snapshot(engine: Any, coords: Mapping[str, int], extra: Mapping[str, Any] | None) -> _Snapshot:
    optimizer = getattr(engine, "optimizer", None)
    # A pipeline splits at its first step; before that every stage holds the whole model.
    whole_on_every_stage = getattr(engine, "pipeline", None) is not None and optimizer is None
    pieces = _model_pieces(engine, coords, whole_on_every_stage)
    values: dict[str, Any] = {}
    groups = None
    if optimizer is not None:
        opt_pieces, values = _optimizer_pieces(engine, coords, whole_on_every_stage)
        pieces += opt_pieces
        groups = [{k: _jsonable(v) for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    pieces = [(k, s, d, r, t.to("cpu", copy=True)) for k, s, d, r, t in pieces]
    return _Snapshot(pieces, values, _rng_state(), getattr(engine, "step_count", 0), groups,
                     copy.deepcopy(dict(extra or {})))


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


def _write(ranks: Ranks, snap: _Snapshot, tmp: str) -> dict[str, Any]:
    file, size, crcs = None, 0, []
    if snap.pieces:
        file = f"rank-{ranks.rank:05d}.safetensors"
        size, crcs = write_pieces(os.path.join(tmp, file), [p[4] for p in snap.pieces])
    rng = f"rng-{ranks.rank:05d}.pt"
    objects = {rng: save_object(snap.rng, os.path.join(tmp, rng))}
    return {"file": file, "size": size, "values": snap.values, "objects": objects,
            "pieces": [(k, list(s), str(d).removeprefix("torch."), r.to_json(), str(i), c)
                       for i, ((k, s, d, r, _), c) in enumerate(zip(snap.pieces, crcs))]}


def _write_and_commit(ranks: Ranks, snap: _Snapshot, path: str, tag: str,
                      on_commit: Callable[[], None] | None) -> None:
    """Collective over ``ranks``: write, then rank 0 indexes and commits (and runs ``on_commit``);
    raises on every rank if any rank failed, leaving the previous checkpoint in place."""
    tmp = staging_dir(path, tag)
    error, meta = None, None
    try:
        meta = _write(ranks, snap, tmp)
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        error = e
    metas = ranks.gather((meta, None if error is None else f"{type(error).__name__}: {error}"))
    outcome = None
    if ranks.rank == 0:
        try:
            failed = [f"rank {r}: {e}" for r, (_, e) in enumerate(metas) if e is not None]
            if failed:
                raise CheckpointError("; ".join(failed))
            tensors, files, values = _merge([m for m, _ in metas])
            objects = {name: crc for m, _ in metas for name, crc in m["objects"].items()}
            objects["extra.pt"] = save_object(snap.extra, os.path.join(tmp, "extra.pt"))
            write_index(tmp, {"format": FORMAT, "step": snap.step, "grid": ranks.sizes,
                              "param_groups": snap.param_groups, "values": values, "files": files,
                              "objects": objects, "tensors": tensors})
            commit(tmp, path, tag)
            if on_commit is not None:
                on_commit()
        except Exception as e:  # noqa: BLE001
            outcome = f"{type(e).__name__}: {e}"
    outcome = ranks.broadcast(outcome)
    if outcome is not None:
        raise CheckpointError(f"saving {path} failed, the previous checkpoint is untouched: {outcome}") from error


class PendingSave:
    """An asynchronous save still writing; ``wait()`` blocks until it is committed and raises
    its error if it failed (on every rank, since the write agrees on errors)."""

    def __init__(self, work: Callable[[], None]) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name="autopar-checkpoint")
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error


def wait_for_pending(engine: Any) -> None:
    """Finish the engine's asynchronous save, if any (before another save or a load)."""
    pending = getattr(model_of(engine), "_autopar_pending_save", None)
    if pending is not None:
        model_of(engine)._autopar_pending_save = None
        pending.wait()


def save_checkpoint(engine: Any, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None,
                    async_save: bool = False, on_commit: Callable[[], None] | None = None) -> PendingSave | None:
    """Save model, optimizer state, step count, RNG states and ``extra`` (e.g. the data loader
    position, a loss scaler's ``state_dict()``: tensors, numbers, strings, lists and dicts) to
    the directory ``path``, replacing a previous checkpoint there only once the new one is
    complete. Collective: call on every rank. ``engine`` may also be a plain ``nn.Module``.

    ``async_save``: return once the state is copied to host memory and write in the background;
    returns a ``PendingSave``. Call its ``wait()`` before ``autopar.destroy()``; the next save or
    load waits for it anyway.

    ``path`` must be a new folder, an empty one or an earlier autopar checkpoint holding nothing
    else; anything else (a regular file, the working directory, a folder with the user's files)
    raises ``CheckpointError`` on every rank before anything is written. ``on_commit``: run by rank
    0 right after the new checkpoint is in place (``save_step`` prunes old steps there)."""
    wait_for_pending(engine)
    ranks, path = Ranks(), os.fspath(path)
    start = None
    if ranks.rank == 0:  # the staging directory exists before the other ranks learn its name
        try:
            check_target(path)
            remove_stale(path)
            start = (uuid.uuid4().hex[:12], None)
            os.makedirs(staging_dir(path, start[0]))
            write_marker(staging_dir(path, start[0]))
        except CheckpointError as e:
            start = (None, str(e))
        except OSError as e:
            start = (None, f"saving {path} failed, the previous checkpoint is untouched: rank 0: "
                           f"{type(e).__name__}: {e}")
    tag, problem = ranks.broadcast(start)
    if problem is not None:
        raise CheckpointError(problem)
    error, snap = None, None
    try:
        snap = _snapshot(engine, ranks.coords, extra)
    except Exception as e:  # noqa: BLE001
        error = e
    ranks.agree(error)
    if not async_save:
        _write_and_commit(ranks, snap, path, tag, on_commit)
        return None
    pending = PendingSave(lambda: _write_and_commit(ranks, snap, path, tag, on_commit))
    model_of(engine)._autopar_pending_save = pending
    return pending
