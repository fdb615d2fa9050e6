"""``PreemptionHook``: turn a signal to one rank into a save by every rank at a step boundary.

Why a hook and an agreement rather than saving in the signal handler: a handler runs between two
bytecodes of whatever the rank is doing, possibly in the middle of a step or a collective, and a
checkpoint is a collective over all ranks. The handler only sets a flag. At each step boundary
every rank calls ``should_stop()``, which all-reduces the flags (MAX) over the world, so if any
rank was signalled, all of them learn it at the same boundary and can save together and exit.

Who gets the signal varies: Slurm's ``--signal=USR1@60`` signals every task, ``--signal=B:USR1@60``
only the batch shell (which forwards it, see ``examples/launch``), ``scancel`` and torchrun send
SIGTERM to all ranks, a user's ``kill`` reaches one. Any of these is enough. Signals are SIGTERM and
SIGUSR1 by default; the previous handlers come back on ``close()`` / leaving the ``with`` block.
"""
from __future__ import annotations

import signal
import time
from types import FrameType, TracebackType
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .state import current_grid, is_initialized

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
Handler = Callable[[int, FrameType | None], Any] | int | None


def _signal(spec: str | int | signal.Signals) -> signal.Signals:
    if isinstance(spec, str):
        name = spec.upper() if spec.upper().startswith("SIG") else "SIG" + spec.upper()
        if not hasattr(signal.Signals, name):
            raise ValueError(f"unknown signal {spec!r}; use a name such as 'SIGTERM' or 'USR1', or a number")
        return signal.Signals[name]
    return signal.Signals(spec)


class PreemptionHook:
    """Collects preemption signals; ``should_stop()`` at each step boundary says, on every rank
    alike, whether any rank received one. Install from the main thread (Python's rule for signal
    handlers)::

        with autopar.PreemptionHook() as preempt:
            for step in range(start, steps):
                engine.step(batch)
                if preempt.should_stop():            # collective
                    autopar.save_step(engine, "ckpt", step + 1)
                    break
    """

    def __init__(self, signals: Sequence[str | int | signal.Signals] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(dict.fromkeys(_signal(s) for s in signals))
        if not self.signals:
            raise ValueError("PreemptionHook needs at least one signal")
        self.received: signal.Signals | None = None  # the first signal this rank got
        self.received_at: float | None = None        # its time.monotonic()
        self._previous: dict[signal.Signals, Handler] = {}

    def install(self) -> PreemptionHook:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionHook:
        return self.install()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self.received_at = signal.Signals(signum), time.monotonic()

    def should_stop(self) -> bool:
        """Whether any rank has received one of the signals. Collective over the world: call it
        on every rank at the same step boundary."""
        local = self.received is not None
        if not is_initialized() or current_grid().world_size == 1:
            return local
        flag = torch.tensor([int(local)], dtype=torch.int32, device=current_grid().device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
