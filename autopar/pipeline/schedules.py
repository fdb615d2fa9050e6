"""Pipeline schedules as plain per-rank action lists.

An action is ``F`` (forward of one microbatch through one chunk), ``B`` (its backward: the full
backward, or only the input gradient under ``zerobubble``) or ``W`` (the deferred weight
gradient, ``zerobubble`` only). Chunk ``c`` of ``pp * v`` lives on rank ``c % pp``, so with
``v > 1`` (interleaved) every rank holds ``v`` chunks spaced ``pp`` apart, as in Megatron-LM.

A list is only the order in which one rank does its work; the runtime blocks on nothing but the
receives an action needs, so any order in which each rank's receives are eventually satisfied
is deadlock free. The generators below produce the standard ones.
"""
from __future__ import annotations

from typing import NamedTuple

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zerobubble")


class Action(NamedTuple):
    kind: str   # "F", "B" or "W"
    chunk: int  # global chunk id, 0 .. pp*v - 1
    mb: int     # microbatch


def _one_f_one_b(pp: int, rank: int, m: int) -> list[Action]:
    """Warm up with ``pp - rank - 1`` forwards, then alternate, then drain: at most
    ``pp - rank`` microbatches are alive on a rank, instead of ``m`` under GPipe."""
    warm = min(pp - rank - 1, m)
    out = [Action("F", rank, i) for i in range(warm)]
    for i in range(m - warm):
        out += [Action("F", rank, warm + i), Action("B", rank, i)]
    out += [Action("B", rank, i) for i in range(m - warm, m)]
    return out


def _zero_bubble(pp: int, rank: int, m: int) -> list[Action]:
    """ZB-H1: 1F1B where ``B`` only computes the input gradient (on the critical path of the
    upstream ranks) and each ``W`` runs ``rank`` backwards later. Later ranks finish their ``B``
    work earliest and would sit idle while the gradient wave travels upstream; the deferred
    ``W`` fill exactly that time. Peak live microbatches stay at ``pp`` (the 1F1B peak)."""
    out, done = [], 0
    for a in _one_f_one_b(pp, rank, m):
        out.append(a)
        if a.kind == "B" and a.mb - rank >= 0:
            out.append(Action("W", rank, a.mb - rank))
            done += 1
    out += [Action("W", rank, i) for i in range(done, m)]
    return out


def _interleaved(pp: int, rank: int, m: int, v: int) -> list[Action]:
    """Megatron-LM's interleaved 1F1B: microbatches go through the rank's chunks in groups of
    ``pp``, which shrinks the warm-up bubble by ``v``."""
    total = m * v

    def unit(i: int, backward: bool) -> tuple[int, int]:
        k = (i // pp) % v
        return (v - 1 - k if backward else k) * pp + rank, (i // (pp * v)) * pp + i % pp

    warm = total if m == pp else min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    out = [Action("F", *unit(i, False)) for i in range(warm)]
    for i in range(total - warm):
        out += [Action("F", *unit(warm + i, False)), Action("B", *unit(i, True))]
    out += [Action("B", *unit(i, True)) for i in range(total - warm, total)]
    return out


def build_schedule(name: str, pp: int, rank: int, m: int, v: int = 1) -> list[Action]:
    if name == "gpipe":
        return [Action("F", rank, i) for i in range(m)] + [Action("B", rank, i) for i in range(m)]
    if name == "1f1b":
        return _one_f_one_b(pp, rank, m)
    if name == "zerobubble":
        return _zero_bubble(pp, rank, m)
    if name == "interleaved":
        return _interleaved(pp, rank, m, v)
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")


def check_schedule(name: str, pp: int, m: int, v: int, layers: int) -> None:
    """Every bad combination raises here, on every rank, before any communication."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"virtual_stages must be a positive integer, got {v!r}")
    if name != "interleaved" and v != 1:
        raise ValueError(f"virtual_stages={v} needs schedule='interleaved' (got {name!r})")
    if pp * v > layers:
        raise ValueError(f"pp={pp} x virtual_stages={v} = {pp * v} stages but the model has only "
                         f"{layers} layers; use pp*virtual_stages <= {layers}, or name where stages "
                         "1.. start with split_points=[...] (a model that reuses one layer across "
                         "its depth, as ALBERT does, counts it once)")
    if name == "interleaved":
        if v < 2:
            raise ValueError("schedule='interleaved' needs virtual_stages >= 2 chunks per rank")
        if layers % (pp * v):
            raise ValueError(f"interleaved: {layers} layers do not split into pp*virtual_stages = "
                             f"{pp}*{v} = {pp * v} equal chunks; choose virtual_stages so that "
                             f"pp*virtual_stages divides {layers}")
        if m % pp:
            raise ValueError(f"interleaved: num_microbatches={m} must be a multiple of pp={pp}")
