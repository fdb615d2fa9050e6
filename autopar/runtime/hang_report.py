"""The hang report: from every rank's published record, who is behind and where.

Kept apart from the recorder (``diagnostics``) so the wording can be read, and tested, on
hand-made records without a process group: the recorder's side writes records, this side reads
them. A record is JSON: ``{"rank", "time", "session", "closed", "seq": {group label: last
sequence number}, "entries": [{"seq", "op", "group", "peer", "shapes", "age", "state", "where"}]}``.
"""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

if TYPE_CHECKING:
    from .diagnostics import _Recorder

log = logging.getLogger("autopar")

KEY = "autopar/diag/{rank}"
LAST_SHOWN = 3  # a laggard's newest collectives quoted in the report
MAX_RANKS_READ = 256  # a report reads at most this many peers' records (one store get each)
P2P_OPS = frozenset({"send", "recv", "isend", "irecv", "batch_isend_irecv"})

# A recorder entry is a list, mutated in place when the collective ends: [seq, op, group label,
# peer(s), shapes, start time, state, work refs, where].
SEQ, OP, GROUP, PEER, SHAPES, T0, STATE, WORK, WHERE = range(9)
IN_FLIGHT, DONE, FAILED = "in flight", "done", "failed"


def _fmt(shapes: list[tuple[Any, ...]]) -> list[str]:
    """``float32[4, 8]`` per tensor argument (``2xfloat32[4]`` for the first of a list of two)."""
    return [f"{prefix}{str(dtype).removeprefix('torch.')}{list(shape)}" for prefix, dtype, shape in shapes]


def describe(e: list[Any] | dict[str, Any]) -> str:
    if isinstance(e, list):
        e = {"op": e[OP], "seq": e[SEQ], "group": e[GROUP], "peer": e[PEER], "shapes": _fmt(e[SHAPES])}
    p = e.get("peer")
    p = [p] if isinstance(p, int) else p or []
    peer = f" with rank{'s' if len(p) > 1 else ''} {','.join(map(str, p))}" if p else ""
    return f"{e['op']} #{e['seq']} on group {e['group']}{peer} ({', '.join(e['shapes']) or 'no tensors'})"


def _read(store: dist.Store, rank: int, session: int) -> dict[str, Any] | None:
    key = KEY.format(rank=rank)
    if not store.check([key]):  # get() would block until the store's timeout for a missing key
        return None
    record = json.loads(store.get(key))
    return record if record.get("session") == session else None  # an earlier init's record


def _position(rec: dict[str, Any], now: float, interval: float) -> str:
    """Where a rank is, from its own last record."""
    stale = now - rec["time"]
    beat = f"last heartbeat {stale:.1f} s ago"
    if stale > 3 * interval + 1:
        beat += ": the process is dead or frozen, not even its heartbeat thread runs"
    if not rec["entries"]:
        return f"has made no collective since init ({beat})"
    last = rec["entries"][-1]
    age = last["age"] + stale  # ages are as of the record; the record itself is ``stale`` old
    if last["state"] == IN_FLIGHT:
        return f"is waiting in {describe(last)} for {age:.1f} s ({beat})"
    if last["state"] == FAILED:
        return (f"gave up in {describe(last)} {age:.1f} s ago (timed out or lost a peer; its own "
                f"report says on whom) ({beat})")
    return (f"last finished {describe(last)} {age:.1f} s ago and is outside any collective "
            f"since: stuck in compute or in the input pipeline ({beat})")


def build_report(rec: _Recorder, entry: list[Any] | None) -> str:
    """Read the records of the failed collective's group and say who is behind and where
    (a laggard's own record says where it is: in compute, or waiting in another group)."""
    rec.publish()  # peers that fail after us see that we gave up here
    if entry is None:
        entry = next((e for e in reversed(rec.entries) if e[STATE] != DONE), None)
        if entry is None:
            return f"autopar: a collective failed on rank {rec.rank}; it had no collective in flight"
    label, seq, shapes, now = entry[GROUP], entry[SEQ], _fmt(entry[SHAPES]), time.time()
    lines = [f"autopar: {describe(entry)} failed on rank {rec.rank} after {now - entry[T0]:.1f} s "
             f"(collective timeout or a peer gone). Ranks of group {label}:"]
    records: dict[int, dict[str, Any] | None] = {}
    # Point to point: the group's sequence numbers are not comparable across ranks (a stage
    # talks to its neighbours only), so the peers' own positions are the report.
    p2p = entry[OP] in P2P_OPS
    peers = [] if entry[PEER] is None else [entry[PEER]] if isinstance(entry[PEER], int) else entry[PEER]
    if p2p:
        lines[0] = lines[0].replace(f"Ranks of group {label}:", "Its peers:")
    todo = list(peers if p2p else [r for r in rec.members.get(label, []) if r != rec.rank]) or list(range(dist.get_world_size()))
    waiting = [rec.rank]
    while todo and len(records) < MAX_RANKS_READ:
        r = todo.pop(0)
        if r in records:
            continue
        records[r] = _read(rec.store, r, rec.session)
    for r, other in records.items():
        if other is None:
            lines.append(f"  rank {r} never reported: dead or stuck outside a collective "
                         f"(no record in the store since this autopar.init)")
            continue
        before = len(lines)
        if p2p:
            lines.append(f"  rank {r} {_position(other, now, rec.interval)}")
            continue
        mine = [e for e in other["entries"] if e["group"] == label and e["seq"] == seq]
        reached = other["seq"].get(label, 0)
        if reached < seq:
            lines.append(f"  rank {r} is behind: it reached only #{reached} on group {label} and "
                         f"{_position(other, now, rec.interval)}")
            lines.append("    its last collectives, newest last: " + "; ".join(
                f"{describe(e)} {e['state']}" + (f" at {e['where']}" if e.get("where") else "")
                for e in other["entries"][-LAST_SHOWN:]))
        elif mine and mine[0]["state"] != DONE and mine[0]["op"] == entry[OP] and \
                mine[0]["shapes"] == shapes:
            if mine[0]["state"] == FAILED:
                lines.append(f"  rank {r} gave up in the same collective (timed out or lost a peer)")
            else:
                waiting.append(r)
        elif mine and (mine[0]["op"] != entry[OP] or mine[0]["shapes"] != shapes):
            lines.append(f"  rank {r} is in {describe(mine[0])} instead: the ranks disagree "
                         f"on the order or the shapes of their collectives (AUTOPAR_DEBUG=1 checks each)")
        else:
            lines.append(f"  rank {r} got past #{seq} on group {label} and {_position(other, now, rec.interval)}")
        if other.get("closed") and len(lines) > before:
            lines[before] += "; it has since left autopar (destroy ran)"
    lines.insert(1, f"  rank{'s' if len(waiting) > 1 else ''} {','.join(map(str, sorted(waiting)))} "
                    f"{'are' if len(waiting) > 1 else 'is'} waiting in {describe(entry)}")
    report = "\n".join(lines)
    if rec.rank == min(waiting):  # one rank logs it, so the job log holds the report once
        log.error("%s", report)
    return report
