"""A pool of gloo ranks that lives for a whole test session (``conftest.py``).

A rank that imports torch, transformers' model families and Dynamo costs ~6.5 CPU-s, so ranks
start once and run the test functions of every module, and they are forked from one fork server
that imported all of that once (``pool_preload``): the 14 ranks of the 2-, 4- and 8-rank pools,
spawned, spent ~90 CPU-s (45 s of the suite on two cores) importing the same modules.

A test hands ``RankPool.run`` a module-level function; every rank runs it inside an initialised
default process group, then ``autopar.destroy()`` cleans up whatever grid the function created.
Any rank's exception fails the test with every failing rank's traceback; a rank that does not
answer in time fails it too, and the pool is restarted so one broken test cannot wedge the next.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import time
import traceback
from datetime import timedelta
from multiprocessing import forkserver
from typing import Any, Callable

GRACE_S = 15.0  # how long the other ranks may still take after one rank failed
# A rank whose thread count passes this is restarted before the next test: destroyed gloo groups
# that something still references keep their transport threads, and on a 2-core machine those
# threads' polling slows every later test (none is known to leak now; this is the backstop).
RESTART_THREADS = 40
IDLE_THREADS = 16  # a pool left idle (between modules) with more than this is closed: its leaked threads spin
# (world size, function, threads) of every run that left a rank above IDLE_THREADS: the pool
# recovers by restarting, and the test summary lists them, since each is a destroy() that left a
# process group alive (zero bubble's retained graph was found this way).
LEAKS: list[tuple[int, str, int]] = []


def _worker(rank: int, world_size: int, port: int, inbox: mp.Queue, outbox: mp.Queue) -> None:
    os.environ.update(OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    import autopar

    torch.set_num_threads(1)
    _freeze_imports()  # done by the fork server already: here it only collects what forking made
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            result = (True, fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - everything goes back to the test as text
            result = (False, traceback.format_exc())
        try:
            autopar.destroy()
        except BaseException:  # noqa: BLE001
            result = (False, f"autopar.destroy() failed after the test:\n{traceback.format_exc()}")
        # destroy() skips its collection when the test already destroyed the grid: collect here,
        # so the thread count sees only groups that something still holds. No freeze here: what
        # a job leaves behind may be garbage in a cycle, and frozen garbage is never collected.
        gc.collect()
        threads = thread_count()
        outbox.put((rank, *result, threads))
    dist.destroy_process_group()


# The model families and torch subsystems the tests use: transformers imports each model module
# lazily, on first attribute access, so without this the first test of each family would add its
# objects to what every later collection walks.
_PREIMPORT = ("LlamaForCausalLM", "GPT2LMHeadModel", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "BertForMaskedLM",
              "BertForSequenceClassification", "ElectraForMaskedLM", "GPTNeoForCausalLM", "GPTJForCausalLM",
              "OPTForCausalLM", "ViTForImageClassification", "WhisperForConditionalGeneration")


def _freeze_imports() -> None:
    """Move everything the imports created into gc's permanent generation, before any grid exists.

    ``autopar.destroy()`` runs a full collection (a destroyed gloo group's threads live until its
    last reference dies), and on every grid change of every test that walked the ~350k objects
    torch and transformers build at import: 0.13-0.17 CPU-s per rank per call (0.8 s of wall time
    on a loaded machine), about half of a pool rank's time. Frozen import-time objects are module
    state that lives for the process anyway, and none of them can reach a process group, since
    none existed when they were frozen.
    """
    import importlib

    import torch._dynamo  # noqa: F401 - imported by the compile tests; large
    import transformers

    for name in _PREIMPORT:
        getattr(transformers, name)
    for module in ("autopar.checkpoint", "autopar.cli.check", "autopar.cli.dry_run", "autopar.cli.plan"):
        importlib.import_module(module)
    gc.collect()
    gc.freeze()


GROUP_THREADS = 3
"""Threads a live gloo group holds (two run loops and one TCP loop): a test whose rank ends with
this many more threads than it started with has left a destroyed group alive."""


def thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: never restart for threads
        return 0


class RankPool:
    """``world_size`` persistent gloo ranks; ``run(fn, ...)`` returns the per-rank results."""

    def __init__(self, world_size: int, timeout: float = 240.0, grace: float = GRACE_S) -> None:
        self.world_size = world_size
        self.timeout = timeout
        self.grace = grace
        self.threads = 0  # the most threads a rank had after the last run
        self._procs: list[mp.Process] = []

    def _start(self) -> None:
        import torch.distributed as dist

        # Forked from a server that has only imported (no threads, no process group): forking a
        # process that holds either is what makes fork unsafe with torch.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["pool_preload"])
        # The server's sys.path is the environment's (3.11's forkserver ignores the one it is
        # handed), and a preload that fails to import is skipped silently: point PYTHONPATH here.
        path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (os.path.dirname(__file__), path)))
        try:
            forkserver.ensure_running()
        finally:
            if path is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = path
        # The pool's own process serves the rendezvous store on a port the OS picks, so pools of
        # concurrent test runs can never race for the same free port.
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        port = self._store.port
        self._inboxes = [ctx.Queue() for _ in range(self.world_size)]
        self._outbox = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, args=(r, self.world_size, port, self._inboxes[r], self._outbox),
                                   daemon=True, name=f"rank{r}") for r in range(self.world_size)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> list[Any]:
        if not self._procs:
            self._start()
        for inbox in self._inboxes:
            inbox.put((fn, args, kwargs))
        deadline = time.monotonic() + (timeout or self.timeout)
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        threads = 0
        while len(results) + len(errors) < self.world_size and time.monotonic() < deadline:
            try:
                rank, ok, payload, n = self._outbox.get(timeout=0.5)
                threads = max(threads, n)
            except queue.Empty:
                for r, p in enumerate(self._procs):
                    if not p.is_alive() and r not in results and r not in errors:
                        errors[r] = f"rank {r} died (exit code {p.exitcode})"
                continue
            (results if ok else errors)[rank] = payload
            if errors:
                deadline = min(deadline, time.monotonic() + self.grace)
        if len(results) == self.world_size:
            self.threads = threads
            if threads > IDLE_THREADS:
                LEAKS.append((self.world_size, fn.__name__, threads))
            if threads > RESTART_THREADS:
                self.close()
            return [results[r] for r in range(self.world_size)]
        missing = [r for r in range(self.world_size) if r not in results and r not in errors]
        self.close(force=True)
        report = [f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors)]
        if missing:
            report.append(f"ranks {missing} did not answer (hung, probably in a collective)")
        raise AssertionError(f"{fn.__name__} failed on {self.world_size} ranks:\n" + "\n".join(report))

    def close(self, force: bool = False) -> None:
        if not self._procs:
            return
        if not force:
            for inbox in self._inboxes:
                inbox.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []
        self._store = None
