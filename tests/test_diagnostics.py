"""Hang and desync diagnostics (issue 15.4): a stuck rank is named within the timeout, debug
mode names a shape/order mismatch on every rank, and a master port held by another process
ends every rank within the timeout with the reason.

Multi-rank cases share one 4-rank pool; each uses a 5 s collective timeout so a hang costs
seconds. Timings are asserted against that timeout: a report that only came from the pool's own
120 s limit, or from a second timeout, fails them.
"""
from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

import autopar
from autopar.runtime import diagnostics

T = 5.0  # the grid's collective timeout in these tests
DEBUG_T = 30.0  # debug mode's: a mismatch must be named long before it (0.2 s measured)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record_and_restore() -> dict[str, Any]:
    original, wait = dist.all_reduce, vars(dist.Work)["wait"]
    grid = autopar.init(dp=2, x=2, timeout=T)
    wrapped = dist.all_reduce is not original
    for _ in range(3):
        dist.all_reduce(torch.ones(4, 2), group=grid.group("dp"))
    dist.all_gather_object([None] * 2, grid.rank, group=grid.group("x"))
    work = dist.all_reduce(torch.ones(3, dtype=torch.float64), group=grid.group("x"), async_op=True)
    work.wait()
    diagnostics._rec.publish()
    record = json.loads(dist.distributed_c10d._get_default_store().get(f"autopar/diag/{grid.rank}"))
    autopar.destroy()
    return {"wrapped": wrapped, "restored": dist.all_reduce is original and vars(dist.Work)["wait"] is wait,
            "record": record}


def test_recorder_counts_per_group_and_is_removed_at_destroy(pool4):
    for r, out in enumerate(pool4.run(_record_and_restore)):
        assert out["wrapped"] and out["restored"], out
        rec = out["record"]
        dp = next(label for label in rec["seq"] if label.startswith("dp["))
        assert rec["seq"][dp] == 3, rec["seq"]
        assert dp == ("dp[0,2]" if r % 2 == 0 else "dp[1,3]")
        ops = [(e["op"], e["seq"], e["shapes"], e["state"]) for e in rec["entries"]]
        assert ("all_reduce", 3, ["float32[4, 2]"], "done") in ops, ops
        # all_gather_object is one entry: its inner all_gather is not counted on its own
        assert [o for o in ops if o[0].startswith("all_gather")] == [("all_gather_object", 1, [], "done")], ops
        assert ops[-1] == ("all_reduce", 2, ["float64[3]"], "done"), ops


def _destroy_during_a_stuck_beat() -> int:
    """The heartbeat is inside a store write that outlasts ``uninstall``'s join (a loaded rank 0's
    store) when the grid is destroyed; returns the threads left beyond the stuck beat's own."""
    import threading

    from mp import thread_count

    entered, release = threading.Event(), threading.Event()
    publish = diagnostics._Recorder.publish

    def stuck(self: Any) -> None:
        if threading.current_thread() is self.thread:  # the beats, not init's or uninstall's record
            entered.set()
            release.wait(30)
        publish(self)

    threads = thread_count()
    beat_s, join_s = os.environ.get(diagnostics.HEARTBEAT_ENV), diagnostics.JOIN_S
    os.environ[diagnostics.HEARTBEAT_ENV] = "0.01"
    diagnostics._Recorder.publish, diagnostics.JOIN_S = stuck, 0.1
    try:
        grid = autopar.init(dp=2, x=2, timeout=T)  # dp and x: groups of 2 out of 4, not the world
        for axis in ("dp", "x"):
            dist.all_reduce(torch.ones(2), group=grid.group(axis))
        del grid  # only the recorder may still hold the groups
        beat = diagnostics._rec.thread
        assert entered.wait(10), "the heartbeat never beat"
        autopar.destroy()
        left = thread_count() - threads - beat.is_alive()
    finally:
        release.set()
        diagnostics._Recorder.publish, diagnostics.JOIN_S = publish, join_s
        if beat_s is None:
            del os.environ[diagnostics.HEARTBEAT_ENV]
        else:
            os.environ[diagnostics.HEARTBEAT_ENV] = beat_s
    beat.join(10)
    return left


def test_a_stuck_heartbeat_does_not_keep_the_groups(pool4):
    """Seen under load in the suite: destroy() left every group of the grid alive (3 threads
    each) until a late heartbeat returned, because the beat's recorder held them."""
    from mp import GROUP_THREADS

    for left in pool4.run(_destroy_during_a_stuck_beat):
        assert left < GROUP_THREADS, f"{left} more threads after destroy(): the stuck beat keeps a group alive"


def _gave_up(folder: str, rank: int) -> None:
    open(os.path.join(folder, str(rank)), "w").close()


def _nap(limit: float, folder: str, ranks: tuple[int, ...]) -> None:
    """'Compute' until every rank of ``ranks`` has given up on this one (``_gave_up``), at most
    ``limit`` s: joining later only makes the test longer."""
    end = time.monotonic() + limit
    while time.monotonic() < end and not all(os.path.exists(os.path.join(folder, str(r))) for r in ranks):
        time.sleep(0.05)


def _hang(sleeper: int, sync_rank: int, async_rank: int, folder: str) -> dict[str, Any]:
    grid = autopar.init(dp=2, x=2, timeout=T)  # rank order x fastest: dp groups [0,2] and [1,3]
    for _ in range(2):
        dist.all_reduce(torch.ones(8), group=grid.group("dp"))
        dist.all_reduce(torch.ones(8), group=grid.group("x"))
    out: dict[str, Any] = {"error": None, "elapsed": None}
    start = time.monotonic()
    try:
        if grid.rank == sleeper:
            _nap(T + 3, folder, (sync_rank, async_rank))  # "compute" past the timeout, then join too late
            dist.all_reduce(torch.ones(8), group=grid.group("dp"))
        elif grid.rank == sync_rank:
            dist.all_reduce(torch.ones(8), group=grid.group("dp"))
        elif grid.rank == async_rank:
            dist.all_reduce(torch.ones(8), group=grid.group("x"), async_op=True).wait()
    except RuntimeError as e:
        out["error"], out["type"] = str(e), type(e).__name__
        _gave_up(folder, grid.rank)
    out["elapsed"] = time.monotonic() - start
    return out


def test_rank_stuck_in_compute_is_named_within_the_timeout(pool4, tmp_path):
    """Rank 3 sleeps in 'compute' past the timeout; rank 1 waits for it in a dp all_reduce
    (sync), rank 2 in an x all_reduce (async, then wait). Both name rank 3 and where it is."""
    out = pool4.run(_hang, 3, 1, 2, str(tmp_path))
    for r in (1, 2):
        msg = out[r]["error"]
        assert msg is not None and out[r]["type"] == "CollectiveHangError", out[r]
        print(f"stuck rank: rank {r} named it {out[r]['elapsed']:.2f} s after entering (timeout {T} s)")
        assert out[r]["elapsed"] < T + 3, f"rank {r} reported after {out[r]['elapsed']:.1f} s"
        group = "dp[1,3]" if r == 1 else "x[2,3]"
        assert f"all_reduce #3 on group {group}" in msg, msg
        assert f"rank 3 is behind: it reached only #2 on group {group}" in msg, msg
        assert "is outside any collective since: stuck in compute" in msg, msg
    assert "waiting in all_reduce #3 on group dp[1,3] (float32[8])" in out[1]["error"]
    # the latecomer learns that its peers gave up on it
    assert out[3]["error"] is not None and "gave up in the same collective" in out[3]["error"], out[3]
    assert out[0]["error"] is None


class Sleepy(torch.nn.Module):
    """A model whose forward can be told to 'compute' (sleep) for a while on one rank."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
        self.nap: Callable[[], None] = lambda: None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.nap()
        return self.net(x)


def _engine_hang(folder: str) -> dict[str, Any]:
    grid = autopar.init(dp=2, x=2, timeout=T)
    torch.manual_seed(0)
    with autopar.auto_parallelize():
        model = Sleepy()
    engine = autopar.parallelize(model, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
                                 loss_fn=lambda out, b: torch.nn.functional.mse_loss(out, b[1]))
    g = torch.Generator().manual_seed(1)
    batch = autopar.shard_batch((torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)))
    engine.step(batch)
    if grid.rank == 3:  # asleep until all the others have given up
        model.nap = functools.partial(_nap, 3 * T, folder, (0, 1, 2))
    out: dict[str, Any] = {"error": None, "type": None}
    start = time.monotonic()
    try:
        engine.step(batch)
    except RuntimeError as e:
        out["error"], out["type"] = str(e), type(e).__name__
        _gave_up(folder, grid.rank)
    out["elapsed"] = time.monotonic() - start
    return out


def test_engine_step_names_the_rank_sleeping_in_its_forward(pool4, tmp_path):
    """Rank 3 sleeps in forward during a dp=2 x x=2 step: its x peer (rank 2) and dp peer
    (rank 1) name it as stuck in compute; rank 0, whose dp peer is rank 2, learns that rank 2
    waits in a collective on the x group [2,3]. All of them within the timeout, not a multiple."""
    out = pool4.run(_engine_hang, str(tmp_path))
    for r in (0, 1, 2):
        print(f"engine hang: rank {r} raised {out[r]['type']} {out[r]['elapsed']:.2f} s into the step (timeout {T} s)")
        assert out[r]["type"] == "CollectiveHangError", out[r]
        # the wait itself, as the report states it, is the timeout; the step adds its compute,
        # seconds on a loaded 2-core machine, and still ends before the sleeper wakes
        waited = float(re.search(rf"failed on rank {r} after (\d+\.\d) s", out[r]["error"]).group(1))
        assert waited < T + 1 and out[r]["elapsed"] < 3 * T, out[r]
    for r in (1, 2):
        assert "rank 3 is behind" in out[r]["error"] and "stuck in compute" in out[r]["error"], out[r]["error"]
    # rank 2 may already have given up on rank 3 when rank 0 reads its record, or still wait there
    assert re.search(r"rank 2 is behind: .* (is waiting in|gave up in) all_reduce #\d+ on group x\[2,3\]",
                     out[0]["error"]), out[0]["error"]


def _mismatch() -> dict[str, Any]:
    os.environ[diagnostics.DEBUG_ENV] = "1"
    try:  # a longer timeout: debug mode doubles the groups to connect, slow on a loaded machine
        grid = autopar.init(dp=2, x=2, timeout=DEBUG_T)
    finally:
        del os.environ[diagnostics.DEBUG_ENV]
    errors: list[str] = []

    class Block(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t, group=grid.group("dp", "x"))  # all four ranks
            return t

    start = time.monotonic()
    try:  # rank 1 reduces 3 elements where every other rank reduces 2
        Block()(torch.ones(3 if grid.rank == 1 else 2))
    except RuntimeError as e:
        errors.append(str(e))
    shape_s = time.monotonic() - start
    try:  # order: in the x group of ranks 0 and 1, rank 0 broadcasts while rank 1 all-reduces
        t = torch.ones(2)
        if grid.rank == 0:
            dist.broadcast(t, src=0, group=grid.group("x"))
        else:
            dist.all_reduce(t, group=grid.group("x"))
    except RuntimeError as e:
        errors.append(str(e))
    return {"errors": errors, "shape_s": shape_s, "level": str(dist.get_debug_level())}


def test_debug_mode_names_a_shape_and_an_order_mismatch_on_every_rank(pool4):
    out = pool4.run(_mismatch)
    for r in range(4):  # rank 1's 3 elements against everyone else's 2, in the all-ranks group
        msg = out[r]["errors"][0]
        print(f"debug mode: rank {r} named the shape mismatch after {out[r]['shape_s']:.2f} s (timeout {DEBUG_T} s)")
        assert "collectives disagree across ranks at all_reduce #1 on group dp,x[0,1,2,3]" in msg, msg
        assert "layer Block, test_diagnostics.py:" in msg and "in forward" in msg, msg
        assert "Tensor shapes: 3vs 2" in msg or "Tensor shapes: 2vs 3" in msg, msg
        assert out[r]["shape_s"] < T, out[r]  # well within even the hang tests' timeout
    for r in (0, 1):  # the x group [0,1]: broadcast against all_reduce
        assert len(out[r]["errors"]) == 2, out[r]
        assert "OpType=BROADCAST" in out[r]["errors"][1] and "OpType=ALLREDUCE" in out[r]["errors"][1], out[r]
        assert "(torch numbers the group's ranks: 0 is rank 0, 1 is rank 1)" in out[r]["errors"][1], out[r]
    for r in (2, 3):  # their x group [2,3] all-reduced in agreement
        assert len(out[r]["errors"]) == 1, out[r]


def test_report_from_records(monkeypatch):
    """The report's wording for each case, from hand-made records in a HashStore: behind in
    compute, behind waiting elsewhere, dead (stale heartbeat), never reported, disagreeing."""
    store = dist.HashStore()
    rec = diagnostics._Recorder(0, store, interval=1.0, debug=False)
    group = "dp[0,1,2,3,4]"
    entry = [42, "all_reduce", group, None, [("", torch.float32, torch.Size([8]))], time.time() - T, diagnostics.FAILED, None, None]
    rec.entries.append(entry)
    rec.groups["g"] = [group, 42]
    rec.members[group] = [0, 1, 2, 3, 4]
    now = time.time()

    def put(rank: int, seq: int, entries: list[dict[str, Any]], age: float = 0.2, session: int = rec.session) -> None:
        store.set(f"autopar/diag/{rank}", json.dumps({"rank": rank, "time": now - age, "seq": {group: seq},
                                                      "session": session,
                                                      "entries": entries}))

    e = {"op": "all_reduce", "group": group, "peer": None, "shapes": ["float32[8]"], "age": 7.0,
         "where": None}
    put(1, 42, [{**e, "seq": 42, "state": "in flight"}])
    put(2, 41, [{**e, "seq": 41, "state": "done"}])
    put(3, 41, [{**e, "seq": 9, "group": "x[3,7]", "state": "in flight"}], age=30.0)
    put(4, 42, [{**e, "seq": 42, "op": "broadcast", "state": "in flight"}])
    monkeypatch.setattr(diagnostics, "_rec", rec)
    report = diagnostics.build_report(rec, entry)
    assert "ranks 0,1 are waiting in all_reduce #42 on group dp[0,1,2,3,4] (float32[8])" in report, report
    assert ("rank 2 is behind: it reached only #41 on group dp[0,1,2,3,4] and last finished all_reduce "
            "#41 on group dp[0,1,2,3,4] (float32[8]) 7.2 s ago and is outside any collective") in report, report
    assert "    its last collectives, newest last: all_reduce #41 on group dp[0,1,2,3,4] (float32[8]) done\n" \
        in report, report
    assert "rank 3 is behind: it reached only #41" in report and "waiting in all_reduce #9 on group x[3,7]" in report
    assert "the process is dead or frozen" in report, report
    assert "rank 4 is in broadcast #42 on group dp[0,1,2,3,4] (float32[8]) instead" in report, report
    store.delete_key("autopar/diag/4")
    put(2, 41, [], age=1.0, session=rec.session - 1)
    report = diagnostics.build_report(rec, entry)
    assert "rank 4 never reported: dead or stuck outside a collective" in report, report
    assert "rank 2 never reported" in report, report  # its record is from an earlier init

    # a long group's label shortens its rank list; the report still reads every member
    big = diagnostics._label(object(), list(range(10)))
    assert big == "group[0,1,2,3,4,5,6,7,...(10 ranks)]", big
    rec.members[big] = list(range(10))
    put(9, 0, [])
    report = diagnostics.build_report(rec, [1, "barrier", big, None, [], time.time() - T, diagnostics.FAILED,
                                            None, None])
    assert f"rank 9 is behind: it reached only #0 on group {big} and has made no collective" in report, report

    # point to point: sequence numbers differ across stages legitimately; the peer's position is the report
    p2p = [7, "batch_isend_irecv", "pp[0,5]", [5], [("irecv(5):", torch.float32, torch.Size([2, 8]))],
           time.time() - T, diagnostics.FAILED, None, None]
    put(5, 3, [{**e, "seq": 3, "group": "x[5,6]", "state": "done", "age": 6.0}])
    report = diagnostics.build_report(rec, p2p)
    assert "rank 0 is waiting in batch_isend_irecv #7 on group pp[0,5] with rank 5 (irecv(5):float32[2, 8])" \
        in report, report
    assert "rank 5 last finished all_reduce #3 on group x[5,6]" in report and "stuck in compute" in report, report


RANK_SCRIPT = """
import sys, time
import torch, torch.distributed as dist
import autopar
t = time.monotonic()
try:
    grid = autopar.init(timeout={timeout})
except Exception as e:
    print(f"ELAPSED {{time.monotonic() - t:.2f}}", flush=True)
    print("ERROR", type(e).__name__, str(e), flush=True)
    sys.exit(3)
x = torch.ones(1)
dist.all_reduce(x, group=grid.group("dp"))
print("INIT OK", x.item(), flush=True)
if grid.rank == {sleeper}:
    time.sleep({timeout} + 2)  # stuck in compute past the timeout
t = time.monotonic()
try:
    dist.all_reduce(x, group=grid.group("dp"))
except RuntimeError as e:
    print(f"HANG {{time.monotonic() - t:.2f}}", type(e).__name__, str(e), flush=True)
"""


def _launch(port: int, world: int, sleeper: int = -1) -> list[tuple[int, str]]:
    """``world`` plain processes, env:// style (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    procs = []
    for r in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "SLURM_"))}
        env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT.format(timeout=T, sleeper=sleeper)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        # the limit covers imports on a loaded 2-core machine; torch's own client alone never ends
        outs = [p.communicate(timeout=120)[0] for p in procs]
        return [(p.returncode, out) for p, out in zip(procs, outs)]
    finally:
        for p in procs:
            p.kill()


@pytest.mark.parametrize("holder", ["listening", "bound"])
def test_port_in_use_ends_every_rank_within_the_timeout(holder: str) -> None:
    """MASTER_PORT is held by another process's socket: rank 0 fails with EADDRINUSE at once,
    ranks 1 and 2 end at the timeout with the reason. A listener that accepts and never answers
    is the case in which torch's own client hangs forever; a bound, closed port the one in which
    its retries run past the timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    if holder == "listening":
        sock.listen(16)
    port = sock.getsockname()[1]
    try:
        results = _launch(port, 3)
    finally:
        sock.close()
    for r, (rc, text) in enumerate(results):
        assert rc == 3, f"rank {r} (rc {rc}):\n{text}"
        elapsed = float(text.split("ELAPSED ")[1].split()[0])
        print(f"port {holder}: rank {r} ended {elapsed:.2f} s after init (timeout {T} s)")
        assert elapsed < 1.5 * T, f"rank {r} took {elapsed} s:\n{text}"
        if r == 0:
            assert f"rank 0 cannot serve the rendezvous store on 127.0.0.1:{port}: the port is already in use" \
                in text, text
        else:
            assert (f"rank {r}: rank 0's rendezvous store at 127.0.0.1:{port} was not reachable within 5 s"
                    in text and "The port may be in use by another process" in text), text


def test_plain_launch_on_a_free_port_forms_and_names_a_stuck_rank() -> None:
    """The same plain launch on a free port: the world forms through autopar's own store (the
    dp group is then the world group), and when rank 1 'computes' past the timeout, rank 0's
    error names it within the timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (rc0, text0), (rc1, text1) = _launch(port, 2, sleeper=1)
    for r, (rc, text) in enumerate([(rc0, text0), (rc1, text1)]):
        assert rc == 0 and "INIT OK 2.0" in text and "HANG " in text, f"rank {r} (rc {rc}):\n{text}"
    elapsed = float(text0.split("HANG ")[1].split()[0])
    print(f"plain launch: rank 0 named the stuck rank {elapsed:.2f} s after entering (timeout {T} s)")
    assert elapsed < T + 3, text0
    assert "CollectiveHangError" in text0 and "rank 1 is behind: it reached only #1 on group world[0,1]" in text0 \
        and "stuck in compute" in text0, text0
