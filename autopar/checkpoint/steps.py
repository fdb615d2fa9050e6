"""Step checkpoints in one run folder: ``save_step`` writes them, ``resume`` picks up the newest.

Why a folder of steps rather than one checkpoint overwritten in place: a job killed at any time
(preemption, time limit, a lost node) must find a complete checkpoint when it is restarted, and a
checkpoint damaged on disk must not end the run when an older one is fine. Each save goes to its
own ``<folder>/step-00000100`` (atomic, as every ``save_checkpoint``); ``resume`` tries them newest
first and loads the first one that passes the all-or-nothing checks of ``load_checkpoint``.

Pruning (``keep_last=N``) deletes only step checkpoints autopar wrote (``owned.is_ours``), only
older than the step just saved or loaded, and only beyond the newest N of those: a newer step
that failed to load is left alone for the user to look at, and the folder's other files (metrics,
plots, logs) are never touched.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any, Mapping

from .load import load_checkpoint
from .local import model_of
from .owned import is_ours, resolve
from .ranks import Ranks
from .save import PendingSave, save_checkpoint
from .storage import INDEX, CheckpointError

log = logging.getLogger("autopar")
STEP = re.compile(r"step-(\d+)")
_LEFTOVER = re.compile(r"step-(\d+)\.(tmp|old)-[0-9a-z]+")


def step_path(folder: str | os.PathLike, step: int) -> str:
    return os.path.join(os.fspath(folder), f"step-{step:08d}")


def complete_steps(folder: str | os.PathLike) -> list[int]:
    """The steps with a complete checkpoint in ``folder``, newest first (a checkpoint whose save
    was killed between its two renames counts, as ``load_checkpoint`` falls back to it)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    steps = set()
    for name in os.listdir(folder):
        match = STEP.fullmatch(name) or _LEFTOVER.fullmatch(name)
        if match is None:
            continue
        try:
            if os.path.exists(os.path.join(resolve(step_path(folder, int(match.group(1)))), INDEX)):
                steps.add(int(match.group(1)))
        except CheckpointError:
            continue
    return sorted(steps, reverse=True)


def _check_keep(keep_last: int | None) -> None:
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last={keep_last!r} must be a positive integer or None (keep every step)")


def prune(folder: str | os.PathLike, newest: int, keep_last: int) -> list[int]:
    """Rank 0: delete the step checkpoints older than the newest ``keep_last`` steps up to and
    including ``newest``, with their killed saves' leftovers; returns the deleted steps."""
    folder = os.fspath(folder)
    older = [s for s in complete_steps(folder) if s <= newest][keep_last:]
    if not older:
        return []
    doomed = set(older)
    for name in sorted(os.listdir(folder)):
        match = STEP.fullmatch(name) or _LEFTOVER.fullmatch(name)
        path = os.path.join(folder, name)
        if match is not None and int(match.group(1)) in doomed and is_ours(path):
            try:
                shutil.rmtree(path)
            except OSError as e:  # the new checkpoint is in place; an old one left over is no error
                log.warning("could not delete the old checkpoint %s: %s", path, e)
    return older


def save_step(engine: Any, folder: str | os.PathLike, step: int | None = None, *, keep_last: int | None = None,
              extra: Mapping[str, Any] | None = None, async_save: bool = False) -> PendingSave | None:
    """``save_checkpoint`` to ``<folder>/step-<step>`` (``step`` defaults to the engine's step
    count), then, once it is complete, delete older step checkpoints beyond the newest
    ``keep_last``. Collective. ``folder`` may hold other files; they are left alone."""
    _check_keep(keep_last)
    if step is None:
        step = getattr(engine, "step_count", None)
        if step is None:
            raise ValueError(f"save_step needs step= for a {type(model_of(engine)).__name__}, which counts no steps")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be a non-negative integer")
    on_commit = None if keep_last is None else (lambda: prune(folder, step, keep_last))
    return save_checkpoint(engine, step_path(folder, step), extra=extra, async_save=async_save, on_commit=on_commit)


def resume(engine: Any, folder: str | os.PathLike, keep_last: int | None = None) -> int:
    """Load the newest complete checkpoint ``save_step`` wrote to ``folder`` into ``engine`` and
    return its step, the step to continue from (0, with nothing loaded, when there is none yet).
    A checkpoint that fails to load (damaged, incomplete) is skipped for the next older one, with
    a warning; the engine is untouched by the failed attempt. If every one fails, the newest one's
    error is raised: the folder then belongs to another model or setup, and starting afresh would
    silently discard it. ``keep_last``: then prune as ``save_step`` does. Collective."""
    _check_keep(keep_last)
    ranks = Ranks()
    steps = ranks.broadcast(complete_steps(folder) if ranks.rank == 0 else None)
    first_error: CheckpointError | None = None
    for step in steps:
        try:
            load_checkpoint(engine, step_path(folder, step))
        except CheckpointError as e:
            first_error = first_error or e
            if ranks.rank == 0:
                log.warning("resume: skipping %s, it cannot be loaded: %s", step_path(folder, step), e)
            continue
        if ranks.rank == 0:
            if first_error is not None:
                log.warning("resume: continuing from the older %s", step_path(folder, step))
            if keep_last is not None:
                prune(folder, step, keep_last)
        return step
    if first_error is not None:
        raise CheckpointError(f"resume: no checkpoint in {folder} can be loaded ({len(steps)} tried); the "
                              f"newest failed with: {first_error}") from first_error
    return 0
