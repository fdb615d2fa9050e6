"""The order in which every rank posts its point-to-point transfers: derived, not hoped for.

NCCL ignores message tags and runs the p2p operations between two ranks in the order they were
posted; a receive (and, above its eager threshold, a send) blocks everything queued behind it
until its peer posts the matching operation. A pipeline whose ranks post in the order of their
own schedules deadlocks: under 1F1B, stage 0 posts ``send A1`` before ``recv G0`` while stage 1
posts ``send G0`` before ``recv A1``, and each waits for the other.

So transfers are grouped by *exchange points* that all ranks agree on. The schedules (plain
action lists, see ``schedules``) are simulated together in unit time steps: an action runs at
the first tick at which its rank is free and its input message was produced at an earlier tick.
Every message produced at tick ``t - 1`` belongs to exchange point ``t``. At exchange point
``t`` each rank posts one grouped launch (``batch_isend_irecv``) with exactly the sends of what
it produced at ``t - 1`` and the receives of what its neighbours produced at ``t - 1``, sorted
by message. Both ends of every message therefore post it in the same launch index, in the same
position, which gives:

* no deadlock, even if every operation blocked until matched and each rank had one stream: by
  induction on ``t``, once all launches of points ``< t`` completed, every launch of point
  ``t`` is at the head of its rank's queue and its peers' halves are too;
* no swapped buffers: per ordered rank pair, sends and receives are posted in the same order.

A rank posts the launch of point ``t`` after its last action of a tick ``< t`` and before its
first action of a tick ``>= t``; a receive is thus posted as soon as its data exists upstream,
and an action only waits for the launch that carries its input. The simulated time is a device
for ordering only: ranks never wait for each other's clocks. ``tests/test_nccl_order.py`` runs
every schedule through an emulator of NCCL's rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

from .schedules import Action, build_schedule

ACT, GRAD = 0, 1


class Message(NamedTuple):
    """What enters chunk ``chunk`` (ACT: sent by ``F`` of chunk - 1) or leaves it backwards
    (GRAD: the input gradients of chunk ``chunk``, sent by its ``B`` to chunk - 1)."""
    kind: int
    chunk: int
    mb: int

    def src(self, pp: int) -> int:
        return (self.chunk - 1) % pp if self.kind == ACT else self.chunk % pp

    def dst(self, pp: int) -> int:
        return self.chunk % pp if self.kind == ACT else (self.chunk - 1) % pp


@dataclass(frozen=True)
class Post:
    """One grouped launch: ``sends`` and ``recvs`` of this rank at exchange point ``point``."""
    point: int
    sends: tuple[Message, ...]
    recvs: tuple[Message, ...]


Step = Union[Post, Action]


def needs(a: Action, chunks: int) -> Message | None:
    """The message action ``a`` waits for, if any."""
    if a.kind == "F" and a.chunk > 0:
        return Message(ACT, a.chunk, a.mb)
    if a.kind == "B" and a.chunk < chunks - 1:
        return Message(GRAD, a.chunk + 1, a.mb)
    return None


def produces(a: Action, chunks: int) -> Message | None:
    """The message action ``a`` sends when it finishes, if any."""
    if a.kind == "F" and a.chunk < chunks - 1:
        return Message(ACT, a.chunk + 1, a.mb)
    if a.kind == "B" and a.chunk > 0:
        return Message(GRAD, a.chunk, a.mb)
    return None


def simulate(actions: list[list[Action]], chunks: int) -> list[list[int]]:
    """The tick of every action of every rank (unit durations). Raises if the schedules
    themselves wait on each other in a cycle."""
    pp = len(actions)
    ticks: list[list[int]] = [[] for _ in range(pp)]
    made: dict[Message, int] = {}
    free = [0] * pp
    while any(len(ticks[r]) < len(actions[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while len(ticks[r]) < len(actions[r]):
                a = actions[r][len(ticks[r])]
                need = needs(a, chunks)
                if need is not None and need not in made:
                    break
                t = max(free[r], made[need] + 1 if need is not None else 0)
                ticks[r].append(t)
                free[r] = t + 1
                out = produces(a, chunks)
                if out is not None:
                    made[out] = t
                progressed = True
        if not progressed:
            stuck = {r: actions[r][len(ticks[r])] for r in range(pp) if len(ticks[r]) < len(actions[r])}
            raise RuntimeError(f"pipeline schedules wait on each other in a cycle: {stuck}")
    return ticks


def build_programs(actions: list[list[Action]], chunks: int) -> list[list[Step]]:
    """Every rank's program: its actions, with the grouped launches placed between them."""
    pp = len(actions)
    ticks = simulate(actions, chunks)
    sends: dict[tuple[int, int], list[Message]] = {}  # (rank, point) -> messages
    recvs: dict[tuple[int, int], list[Message]] = {}
    for r in range(pp):
        for a, t in zip(actions[r], ticks[r]):
            out = produces(a, chunks)
            if out is not None:
                sends.setdefault((r, t + 1), []).append(out)
                recvs.setdefault((out.dst(pp), t + 1), []).append(out)
    programs: list[list[Step]] = []
    for r in range(pp):
        points = sorted({p for (rank, p) in (*sends, *recvs) if rank == r})
        posts = [Post(p, tuple(sorted(sends.get((r, p), ()))), tuple(sorted(recvs.get((r, p), ()))))
                 for p in points]
        program: list[Step] = []
        i = 0
        for a, t in zip(actions[r], ticks[r]):
            while i < len(posts) and posts[i].point <= t:
                program.append(posts[i])
                i += 1
            program.append(a)
        program.extend(posts[i:])
        programs.append(program)
    return programs


def forward_only(pp: int, rank: int, m: int, v: int) -> list[Action]:
    """Forward passes only (evaluation): every microbatch through this rank's chunks in order."""
    return [Action("F", c, mb) for mb in range(m) for c in range(rank, pp * v, pp)]


def rank_programs(schedule: str, pp: int, m: int, v: int) -> list[list[Step]]:
    """The programs of all ``pp`` ranks for ``schedule`` (or ``"forward"``): every rank derives
    all of them, so that each knows the exchange points of its neighbours."""
    if schedule == "forward":
        actions = [forward_only(pp, r, m, v) for r in range(pp)]
    else:
        actions = [build_schedule(schedule, pp, r, m, v) for r in range(pp)]
    return build_programs(actions, pp * v)
