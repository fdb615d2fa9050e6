"""The pipeline's point-to-point posting order under NCCL's rules, emulated on the CPU.

The emulator is stricter than NCCL: every rank has one in-order queue of launches (a launch is
one grouped ``batch_isend_irecv``, or one lone operation); only the launch at the head of a
queue makes progress; tags are ignored, so the k-th send from a to b meets the k-th receive at
b from a; and a send blocks until its receive is posted, like a rendezvous send above NCCL's
eager threshold. An operation completes when both halves are in head launches; a launch
completes when all its operations did. A rank's program runs ``Post`` steps without waiting
and each action once the launch carrying its input has completed. Passing here means no
deadlock and no swapped buffers for any buffering NCCL may choose.
"""
from __future__ import annotations

import itertools

import pytest

from autopar.pipeline.program import Message, Post, needs, produces, rank_programs
from autopar.pipeline.schedules import Action, build_schedule

Op = tuple[str, int, Message]  # ("send" | "recv", peer, message)


def emulate(pp: int, programs: list[list[list[Op] | Action]], chunks: int) -> str | None:
    """None if every program runs to its end, else a description of the deadlock or mix-up."""
    queues: list[list[list[Op]]] = [[] for _ in range(pp)]
    done_ops: list[set[int]] = [set() for _ in range(pp)]  # indices into the head launch
    completed: list[set[Message]] = [set() for _ in range(pp)]  # messages received so far
    counters: dict[tuple[str, int, int], int] = {}
    seq: list[list[list[int]]] = [[] for _ in range(pp)]  # per launch: per op its FIFO number
    pc = [0] * pp
    while True:
        moved = False
        for r in range(pp):  # run each program as far as it goes
            while pc[r] < len(programs[r]):
                step = programs[r][pc[r]]
                if isinstance(step, list):
                    numbers = []
                    for kind, peer, _ in step:
                        key = (kind, r, peer) if kind == "send" else (kind, peer, r)
                        numbers.append(counters.get(key, 0))
                        counters[key] = numbers[-1] + 1
                    queues[r].append(step)
                    seq[r].append(numbers)
                else:
                    need = needs(step, chunks)
                    if need is not None and need not in completed[r]:
                        break
                pc[r] += 1
                moved = True
        for r in range(pp):  # match operations of head launches
            if not queues[r]:
                continue
            for i, (kind, peer, msg) in enumerate(queues[r][0]):
                if i in done_ops[r] or not queues[peer]:
                    continue
                want = ("recv" if kind == "send" else "send", r)
                number = seq[r][0][i]
                for j, (k2, p2, m2) in enumerate(queues[peer][0]):
                    if (k2, p2) == want and seq[peer][0][j] == number and j not in done_ops[peer]:
                        if m2 != msg:
                            return f"rank {r} {kind} {msg} met {k2} {m2} on rank {peer} (swapped buffers)"
                        done_ops[r].add(i)
                        done_ops[peer].add(j)
                        moved = True
        for r in range(pp):
            if queues[r] and len(done_ops[r]) == len(queues[r][0]):
                completed[r].update(m for k, _, m in queues[r][0] if k == "recv")
                queues[r].pop(0)
                seq[r].pop(0)
                done_ops[r] = set()
                moved = True
        if all(pc[r] == len(programs[r]) and not queues[r] for r in range(pp)):
            return None
        if not moved:
            stuck = {r: (programs[r][pc[r]] if pc[r] < len(programs[r]) else "end",
                         queues[r][0] if queues[r] else None) for r in range(pp)}
            return f"deadlock: {stuck}"


def grouped(pp: int, schedule: str, m: int, v: int) -> list[list[list[Op] | Action]]:
    """The programs the runtime executes (``pipeline.program``), as launches of operations."""
    out = []
    for r, program in enumerate(rank_programs(schedule, pp, m, v)):
        steps: list[list[Op] | Action] = []
        for step in program:
            if isinstance(step, Post):
                steps.append([("send", s.dst(pp), s) for s in step.sends] +
                             [("recv", s.src(pp), s) for s in step.recvs])
            else:
                steps.append(step)
        out.append(steps)
    return out


def legacy(pp: int, schedule: str, m: int, v: int, lookahead: int = 2) -> list[list[list[Op] | Action]]:
    """The posting order before exchange points: receives posted ``lookahead`` actions ahead and
    each send after its action, every operation on its own, relying on tags."""
    chunks = pp * v
    out = []
    for r in range(pp):
        actions = build_schedule(schedule, pp, r, m, v)
        steps: list[list[Op] | Action] = []
        posted: set[Message] = set()
        for i, a in enumerate(actions):
            for ahead in actions[i:i + lookahead]:
                need = needs(ahead, chunks)
                if need is not None and need not in posted:
                    posted.add(need)
                    steps.append([("recv", need.src(pp), need)])
            steps.append(a)
            made = produces(a, chunks)
            if made is not None:
                steps.append([("send", made.dst(pp), made)])
        out.append(steps)
    return out


def configurations() -> list[tuple[str, int, int, int]]:
    found = []
    for pp, m in itertools.product((2, 3, 4), (1, 2, 3, 4, 8)):
        found += [("gpipe", pp, m, 1), ("1f1b", pp, m, 1), ("zerobubble", pp, m, 1), ("forward", pp, m, 1)]
        for v in (2, 3):
            if m % pp == 0:
                found += [("interleaved", pp, m, v), ("forward", pp, m, v)]
    return found


@pytest.mark.parametrize("schedule,pp,m,v", configurations())
def test_grouped_posting_order_cannot_deadlock_under_nccl_rules(schedule: str, pp: int, m: int, v: int) -> None:
    assert emulate(pp, grouped(pp, schedule, m, v), pp * v) is None


def test_emulator_finds_the_deadlock_of_the_old_posting_order() -> None:
    """The emulator must fail on what the runtime used to do (issue: 40 of 41 deadlock)."""
    results = {(s, pp, m, v): emulate(pp, legacy(pp, s, m, v), pp * v)
               for s, pp, m, v in configurations() if s != "forward"}
    deadlocked = [k for k, r in results.items() if r is not None]
    assert ("1f1b", 2, 4, 1) in deadlocked
    assert len(deadlocked) >= 0.8 * len(results), sorted(set(results) - set(deadlocked))


def test_emulator_catches_swapped_buffers() -> None:
    """Two activations posted in opposite orders on the two ends are a silent mix-up."""
    a0, a1 = Message(0, 1, 0), Message(0, 1, 1)
    programs = [[[("send", 1, a0)], [("send", 1, a1)]],
                [[("recv", 0, a1)], [("recv", 0, a0)]]]
    assert "swapped" in emulate(2, programs, 2)


def test_every_message_is_posted_once_on_each_end() -> None:
    for schedule, pp, m, v in configurations():
        programs = rank_programs(schedule, pp, m, v)
        sent = [s for prog in programs for st in prog if isinstance(st, Post) for s in st.sends]
        got = [s for prog in programs for st in prog if isinstance(st, Post) for s in st.recvs]
        assert sorted(sent) == sorted(got) and len(set(sent)) == len(sent)
        for r, prog in enumerate(programs):  # a send is posted after the action that made it
            done: set[Message] = set()
            for st in prog:
                if isinstance(st, Post):
                    assert set(st.sends) <= done, (schedule, pp, m, v, r, st)
                else:
                    made = produces(st, pp * v)
                    if made is not None:
                        done.add(made)
