"""Hang and desync diagnostics: which rank is behind, and where, when a collective times out.

Why: a gloo timeout says only "Timed out waiting 180000ms for recv operation" on the ranks that
waited. It names neither the rank that is late nor what it was doing, and a stuck rank cannot
answer a question asked after the fact. So every rank keeps a flight recorder (a ring buffer of
its last collectives: operation, group, per-group sequence number, shapes and dtypes) and a
daemon heartbeat thread publishes it to the c10d store (key ``autopar/diag/<rank>``) every
``AUTOPAR_HEARTBEAT_S`` seconds (default 1). The thread runs while the main thread sleeps, waits
in C++ or spins in Python (the interpreter hands the GIL over every few milliseconds), so a
rank's last position is known even when it is stuck. When a collective fails with a timeout (or
with the closed connections a peer's timeout leaves behind), the failing rank reads its peers'
records and raises :class:`CollectiveHangError` naming the ranks that are behind.

While autopar is initialised, torch.distributed's collective functions are wrapped (bound at
``install``, restored at ``uninstall``), and so is ``Work.wait`` for async collectives. The hot
path is a dict update and a deque append: no host sync, no extra collective, no store access.

``AUTOPAR_DEBUG=1`` turns on torch's own cross-rank check (``TORCH_DISTRIBUTED_DEBUG=DETAIL``:
every group made by ``new_group`` is wrapped in a ProcessGroupWrapper that compares operation,
shapes and dtypes across ranks before each collective) and adds autopar's context to its
message: the group's axes and the layer that issued the collective. ``split_group`` groups are
not wrapped by torch, so ``init`` makes groups with ``new_group`` in debug mode.
"""
from __future__ import annotations

import atexit
import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable

import torch
import torch.distributed as dist

from .hang_report import (DONE, FAILED, GROUP, IN_FLIGHT, KEY, OP, PEER, SEQ, SHAPES, STATE, T0,
                          WHERE, WORK, _fmt, build_report, describe)

HEARTBEAT_ENV = "AUTOPAR_HEARTBEAT_S"
JOIN_S = 5.0  # how long uninstall waits for a beat in progress
DEBUG_ENV = "AUTOPAR_DEBUG"
HISTORY = 16  # entries published per rank: enough to see the step a rank is in

OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
       "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "all_to_all",
       "all_to_all_single", "barrier", "monitored_barrier", "gather", "scatter", "all_gather_object",
       "broadcast_object_list", "gather_object", "scatter_object_list", "send", "recv", "isend",
       "irecv", "batch_isend_irecv")
HANG_MARKERS = ("Timed out", "timed out", "Connection closed by peer", "pair closure",
                "failed to pass monitoredBarrier", "Connection reset by peer")
MISMATCH_MARKER = "Detected mismatch between collectives"


class CollectiveHangError(dist.DistBackendError):
    """A collective timed out (or lost its peers); the message names the ranks that are behind."""


class CollectiveMismatchError(dist.DistBackendError):
    """Ranks entered different collectives (operation, shape or dtype): debug mode found it."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0", "false", "False")


class _Depth(threading.local):
    """Per thread, as a checkpoint's background thread issues collectives of its own."""

    depth = 0  # > 0 inside a wrapped collective: nested torch calls are not recorded twice


class _Recorder:
    """This rank's flight recorder and the publisher of its record to the store."""

    def __init__(self, rank: int, store: dist.Store, interval: float, debug: bool) -> None:
        self.rank, self.store, self.interval, self.debug = rank, store, interval, debug
        self.entries: deque[list[Any]] = deque(maxlen=HISTORY)
        self.groups: dict[Any, list[Any]] = {}  # group -> [label, last seq]; strong refs until uninstall
        self.world: Any = dist.group.WORLD
        self.tls = _Depth()
        self.members: dict[str, list[int]] = {}  # label -> all global ranks (labels shorten long lists)
        self.session = _sessions  # which autopar.init of this process: older records are stale
        self.closed = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="autopar-heartbeat", daemon=True)

    def begin(self, op: str, group: Any, peer: int | None, args: tuple[Any, ...]) -> list[Any]:
        group = group if group is not None else self.world
        info = self.groups.get(group)
        if info is None:
            ranks = _ranks(group)
            info = self.groups[group] = [_label(group, ranks), 0]
            self.members[info[0]] = ranks
        info[1] += 1
        entry = [info[1], op, info[0], peer, _shapes(args), time.time(), IN_FLIGHT, None,
                 _where() if self.debug else None]
        self.entries.append(entry)
        return entry

    def record(self) -> dict[str, Any]:
        now, out = time.time(), []
        for e in list(self.entries):  # list() copies under the GIL: appends cannot interleave
            state = e[STATE]
            if state == IN_FLIGHT and e[WORK] is not None and all(
                    (w := ref()) is None or w.is_completed() for ref in e[WORK]):
                state = DONE  # a released or completed async work has finished
            out.append({"seq": e[SEQ], "op": e[OP], "group": e[GROUP], "peer": e[PEER],
                        "shapes": _fmt(e[SHAPES]), "age": round(now - e[T0], 2), "state": state,
                        "where": e[WHERE]})
        return {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "time": now,
                "session": self.session, "closed": self.closed,
                "seq": {label: seq for label, seq in self.groups.values()}, "entries": out}

    def publish(self) -> None:
        self.store.set(KEY.format(rank=self.rank), json.dumps(self.record()))

    def _beat(self) -> None:
        failures = 0
        while not self.stop.wait(self.interval):
            try:
                self.publish()
                failures = 0
            except Exception:  # noqa: BLE001 - the store may be gone at shutdown; never kill training
                failures += 1
                if failures >= 3:
                    return


_rec: _Recorder | None = None
_sessions = 0  # inits so far; every rank of a world inits as often, so the counts agree
_saved: list[tuple[Any, str, Any]] = []  # (namespace, name, original) to restore
_saved_debug: Any = None


def _ranks(group: Any) -> list[int]:
    try:
        return list(dist.get_process_group_ranks(group))
    except Exception:  # noqa: BLE001 - a group this rank is not in
        return []


def _label(group: Any, ranks: list[int]) -> str:
    """``dp[1,3]``: the group's axes (autopar's group_desc) and its global ranks."""
    desc = getattr(group, "group_desc", "") or ""
    desc = desc.removeprefix("autopar:") if desc.startswith("autopar:") else (
        "world" if group is dist.group.WORLD else desc or "group")
    shown = ",".join(map(str, ranks[:8])) + (f",...({len(ranks)} ranks)" if len(ranks) > 8 else "")
    return f"{desc}[{shown}]"


def _shapes(args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The tensor arguments' (prefix, dtype, shape), unformatted: formatting waits for a publish."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(("", a.dtype, a.shape))
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            out.append((f"{len(a)}x", a[0].dtype, a[0].shape))
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], dist.P2POp):
            out.extend((f"{p.op.__name__}({p.peer}):", p.tensor.dtype, p.tensor.shape) for p in a[:8])
    return out


def _where() -> str:
    """Debug mode only: the innermost module ``forward`` and the first caller outside torch."""
    frame, layer, site = sys._getframe(2), None, None
    while frame is not None and (layer is None or site is None):
        path = frame.f_code.co_filename
        if site is None and f"{os.sep}torch{os.sep}" not in path and path != __file__:
            site = f"{os.path.basename(path)}:{frame.f_lineno} in {frame.f_code.co_name}"
        if layer is None and frame.f_code.co_name == "forward" and isinstance(
                frame.f_locals.get("self"), torch.nn.Module):
            layer = type(frame.f_locals["self"]).__name__
        frame = frame.f_back
    return f"layer {layer}, {site}" if layer else f"{site}"


def _wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    params = list(inspect.signature(fn).parameters)
    g_at = params.index("group") if "group" in params else None
    peer_name = next((p for p in ("dst", "src") if p in params), None) if op in (
        "send", "recv", "isend", "irecv") else None
    p_at = params.index(peer_name) if peer_name else None

    @functools.wraps(fn)
    def collective(*args: Any, **kwargs: Any) -> Any:
        rec = _rec
        # Under torch.compile the original is traced (Dynamo maps it to a functional
        # collective); the recorder's Python would only add graph breaks, so compiled
        # collectives go unrecorded.
        if torch.compiler.is_compiling() or rec is None or rec.tls.depth:
            return fn(*args, **kwargs)
        group = kwargs.get("group", args[g_at] if g_at is not None and len(args) > g_at else None)
        peer = kwargs.get(peer_name, args[p_at] if p_at is not None and len(args) > p_at else None) \
            if peer_name else None
        if op == "batch_isend_irecv" and args and args[0]:
            group, peer = args[0][0].group, sorted({p.peer for p in args[0]})
        entry = rec.begin(op, group, peer, args)
        tls = rec.tls
        tls.depth += 1
        try:
            out = fn(*args, **kwargs)
        except RuntimeError as e:
            entry[STATE] = FAILED
            better = explain(e, entry)
            if better is e:
                raise
            raise better from e
        finally:
            tls.depth -= 1
        works = out if isinstance(out, list) else [out]
        if out is not None and all(isinstance(w, dist.Work) for w in works):
            entry[WORK] = [weakref.ref(w) for w in works]  # weak: a work holds its tensors alive
        else:
            entry[STATE] = DONE
        return out

    return collective


def _wait(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wait(work: dist.Work, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(work, *args, **kwargs)
        except RuntimeError as e:
            rec = _rec
            if rec is None or rec.tls.depth:  # inside a wrapped collective: it explains the error
                raise
            entry = next((x for x in reversed(rec.entries) if x[WORK] and any(r() is work for r in x[WORK])),
                         None)
            if entry is not None:
                entry[STATE] = FAILED
            better = explain(e, entry)
            if better is e:
                raise
            raise better from e

    return wait


def install(rank: int, timeout_s: float, debug: bool) -> None:
    """Start recording this rank's collectives and publishing them. Call once the world exists."""
    global _rec, _sessions
    if _rec is not None or os.environ.get("AUTOPAR_DIAGNOSTICS", "1") == "0":
        return
    # One store set per rank per beat, all on rank 0's store: beat less often in large worlds.
    default = min(max(1.0, dist.get_world_size() / 1024), timeout_s / 5)
    interval = float(os.environ.get(HEARTBEAT_ENV, default))
    store = dist.distributed_c10d._get_default_store()
    _sessions += 1
    _rec = _Recorder(rank, store, interval, debug)
    c10d = dist.distributed_c10d
    for name in OPS:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        wrapped = _wrap(name, fn)
        for ns in (dist, c10d):  # c10d's own helpers (all_gather_object -> all_gather) call its globals
            if getattr(ns, name, None) is fn:
                _saved.append((ns, name, fn))
                setattr(ns, name, wrapped)
    # The class's own dict entry (pybind's instance method), not the bare function the
    # attribute lookup returns: restoring that would leave ``wait`` unbound.
    _saved.append((dist.Work, "wait", vars(dist.Work)["wait"]))
    dist.Work.wait = _wait(dist.Work.wait)
    _rec.publish()  # a fresh record now: a rank that hangs before its first beat is still known
    _rec.thread.start()
    if _sessions == 1:  # a script that ends without destroy(): no beat during interpreter teardown
        atexit.register(lambda: _rec is not None and _rec.stop.set())


def uninstall() -> None:
    """Restore torch's functions, stop the heartbeat and leave a final record (kept, not deleted:
    a peer that fails later still learns where this rank gave up). Safe to call twice."""
    global _rec, _saved_debug
    rec, _rec = _rec, None
    while _saved:
        ns, name, fn = _saved.pop()
        setattr(ns, name, fn)
    if _saved_debug is not None:
        dist.set_debug_level(_saved_debug)
        _saved_debug = None
    if rec is not None:
        rec.stop.set()
        rec.thread.join(timeout=JOIN_S)
        # A beat still stuck in the store (a loaded or dying rank 0) keeps the recorder alive in
        # its thread, so the recorder must let go of the groups here: a gloo group's threads live
        # as long as any reference to it, and destroy() must leave none.
        rec.groups = {info[0]: info for info in rec.groups.values()}
        rec.world = None
        rec.closed = True
        try:
            rec.publish()
        except Exception:  # noqa: BLE001 - the store may already be gone
            pass


def enable_debug() -> None:
    """Torch's cross-rank collective check for every group made from now on (before init)."""
    global _saved_debug
    if _saved_debug is None:
        _saved_debug = dist.get_debug_level()
    dist.set_debug_level(dist.DebugLevel.DETAIL)


def explain(err: RuntimeError, entry: list[Any] | None) -> RuntimeError:
    """``err`` with the cross-rank report when it is a hang or a mismatch; ``err`` itself otherwise."""
    if isinstance(err, (CollectiveHangError, CollectiveMismatchError)) or _rec is None:
        return err
    text = str(err)
    cause = next((line for line in text.splitlines() if line.strip()), "")[:300]
    if MISMATCH_MARKER in text:
        head = describe(entry) if entry else "a collective"
        where = f" ({entry[WHERE]})" if entry and entry[WHERE] else ""
        members = _rec.members.get(entry[GROUP], []) if entry else []
        numbering = (f" (torch numbers the group's ranks: {', '.join(f'{i} is rank {g}' for i, g in enumerate(members))})"
                     if members else "")
        return CollectiveMismatchError(
            f"autopar debug: collectives disagree across ranks at {head}{where} on rank "
            f"{_rec.rank}: {text.strip()}{numbering}")
    if not any(m in text for m in HANG_MARKERS):
        return err
    try:
        report = build_report(_rec, entry)
    except Exception as e:  # noqa: BLE001 - the report must never hide the original error
        report = f"(no cross-rank report: {type(e).__name__}: {e})"
    return CollectiveHangError(f"{report}\n(torch on rank {_rec.rank}: {cause})")
