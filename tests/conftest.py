import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from mp import IDLE_THREADS, LEAKS, RankPool  # noqa: E402


# One pool per size for the whole session: started once per module, pools were a fifth of the
# suite (their ranks are forked from a process that imported once: mp.py). A rank function leaves
# nothing behind (``RankPool.run`` destroys its grid), and a failed or hung one restarts the pool.
_POOLS: list[RankPool] = []


def _pool_session(n: int):
    pool = RankPool(n)
    _POOLS.append(pool)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool2():
    yield from _pool_session(2)


@pytest.fixture(scope="session")
def pool4():
    yield from _pool_session(4)


@pytest.fixture(scope="session")
def pool8():
    yield from _pool_session(8)


@pytest.fixture(scope="module", autouse=True)
def _close_leaky_pools():
    """After each module, a pool whose ranks hold leaked gloo threads is closed (started again
    when next needed): idle, those threads would poll through every later module."""
    yield
    for pool in _POOLS:
        if pool.threads > IDLE_THREADS:
            pool.close()
            pool.threads = 0


@pytest.fixture(scope="session")
def gpt_reference(tmp_path_factory):
    """The folder of one uninterrupted run of ``gpt_job``'s job: the reference of both preemption
    tests (``test_resume``, ``test_resume_slurm``), run once for the two."""
    from gpt_job import finish, launch

    out = tmp_path_factory.mktemp("gpt-reference")
    for rc, log in finish(launch(str(out))):
        assert rc == 0, log
    return str(out)


_module_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Per-module wall time (set-up, call and tear-down, rank pools included), for the summary."""
    module = report.nodeid.split("::", 1)[0]
    _module_seconds[module] = _module_seconds.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """The suite has a 15-minute budget on a 2-core machine: show where the time goes."""
    if not _module_seconds:
        return
    terminalreporter.write_sep("-", "seconds per test module")
    for module, seconds in sorted(_module_seconds.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}  {module}")
    terminalreporter.write_line(f"{sum(_module_seconds.values()):8.1f}  total")
    if LEAKS:
        terminalreporter.write_sep("-", "rank functions that left process groups alive after destroy()")
        for world, name, threads in LEAKS:
            terminalreporter.write_line(f"{name} on {world} ranks: {threads} threads on a rank")
