"""The planner (issue 16.3): ``autopar.cli.cost``'s step-time model against hand-computed values
on tiny shapes, the intra/inter-node rule, infeasible grids, a deterministic ranking, and
``autopar.init(grid="auto")`` choosing the top grid identically on every (simulated) rank."""
from __future__ import annotations

import math
import random

import pytest
import torch.distributed as dist

import autopar
from autopar.cli import cost, models
from autopar.cli.plan import Layer, Shape, candidate_grids, shape_of
from autopar.runtime.grid import resolve_sizes

# 1 FLOP/s, 1 byte/s and 1 s per call make every time equal its hand-counted FLOPs or bytes.
UNIT = cost.Hardware("unit", flops=1.0, memory=1e12, ranks_per_node=4, intra_bw=1.0, inter_bw=1.0, latency=0.0)


def _shape(blocks: int = 1) -> Shape:
    """``blocks`` blocks of one 8 x 8 weight, nothing else, seq 4 (no attention: hidden is None)."""
    return Shape([Layer(8, 8, True)] * blocks, 0, 0, blocks, None, None, 4)


def _grid(**kw: int) -> dict[str, int]:
    return resolve_sizes(math.prod(kw.values()), **{"dp": 1, **kw})


def test_compute_and_dp_overlap_by_hand() -> None:
    # dp=2, batch 2 x 4 tokens: 4 tokens per rank, 6 * 8 * 8 * 4 = 1536 FLOPs. The all-reduce
    # sends 2 * (1/2) * 64 params * 4 B = 256 B, behind a backward of 2/3 * 1536 = 1024 s: hidden.
    c = cost.step_cost(_shape(), _grid(dp=2), 2, 1, UNIT)
    assert c.compute == 1536 and c.comm["dp"] == 0 and c.bubble == 0 and c.step == 1536
    slow = cost.step_cost(_shape(), _grid(dp=2), 2, 1, cost.dataclasses.replace(UNIT, inter_bw=1 / 8, intra_bw=1 / 8))
    assert slow.comm["dp"] == 256 * 8 - 1024  # what the backward does not hide


def test_tensor_parallel_comm_is_exposed_with_latency() -> None:
    # x=2, 8 tokens: forward all-reduce of the 8 outputs 2*(1/2)*8 + backward gather of the 8
    # inputs (1/2)*8 = 12 floats per token, 8 tokens, 4 B: 384 B; 2 calls of 5 s; compute halves.
    c = cost.step_cost(_shape(), _grid(x=2), 2, 1, cost.dataclasses.replace(UNIT, latency=5.0))
    assert c.compute == 6 * 64 * 8 / 2 and c.comm["x"] == 384 + 10 and c.comm["y"] == 0
    y = cost.step_cost(_shape(), _grid(y=2), 2, 1, UNIT)
    assert y.comm["y"] == 8 * 4 * (8 / 2 + 2 * 8 / 2) and y.comm["x"] == 0


def test_z_gather_hides_behind_forward_but_not_the_reduce_scatter() -> None:
    # z=2: 2 * (1/2) * 64 * 4 B = 256 B per microbatch; half is the prefetched gather.
    c = cost.step_cost(_shape(), _grid(z=2), 2, 1, UNIT)
    assert c.compute == 1536 and c.comm["z"] == 128  # forward 512 s hides the 128 s gather
    slow = cost.step_cost(_shape(), _grid(z=2), 2, 1, cost.dataclasses.replace(UNIT, intra_bw=1 / 8))
    assert slow.comm["z"] == (1024 - 512) + 1024


@pytest.mark.parametrize("schedule, stalls", [("gpipe", 1), ("1f1b", 1), ("interleaved", 0.5), ("zerobubble", 0)])
def test_bubble_per_schedule(schedule: str, stalls: float) -> None:
    # pp=2, 2 blocks, M=4 microbatches, 8 tokens; the p2p sends are 0 (no hidden size): the
    # bubble is (pp-1)/(M+pp-1) of the step for gpipe/1f1b, half of that slot count interleaved.
    c = cost.step_cost(_shape(2), _grid(pp=2), 2, 4, UNIT, schedule)
    assert c.compute == 6 * 64 * 8 and c.bubble == stalls * c.compute / 4
    if schedule == "1f1b":
        assert math.isclose(c.bubble / c.step, (2 - 1) / (4 + 2 - 1))
    with pytest.raises(ValueError, match=r"unknown schedule 'bogus'; choose one of \('gpipe', "):
        cost.step_cost(_shape(2), _grid(pp=2), 2, 4, UNIT, "bogus")


def test_intra_or_inter_node_by_rank_order() -> None:
    # rank order pp, dp, z, y, x (x innermost); 8 ranks per node
    sizes = _grid(pp=2, dp=2, y=2, x=4)
    assert [cost.intra_node(a, sizes, 8) for a in ("x", "y", "dp", "pp")] == [True, True, False, False]
    sizes = _grid(z=4, y=2, x=2)  # z's members 0, 4, 8, 12 span two nodes
    assert [cost.intra_node(a, sizes, 8) for a in ("x", "y", "z")] == [True, True, False]
    assert not cost.intra_node("x", _grid(x=3, dp=8), 8)  # ranks 6, 7, 8 straddle a boundary
    assert all(cost.intra_node(a, _grid(pp=2, z=2, x=2), 8) for a in ("pp", "z", "x"))  # one node
    c = cost.step_cost(_shape(), _grid(dp=2, x=4), 2, 1, cost.dataclasses.replace(UNIT, intra_bw=2.0))
    assert c.links == {"x": "intra", "dp": "inter"}  # UNIT has 4 ranks per node


def test_infeasible_grids_are_flagged_and_ranked_last() -> None:
    small = cost.dataclasses.replace(UNIT, memory=1000.0)  # 64 params x 16 B = 1024 B whole
    assert "GiB > 90% of" in cost.step_cost(_shape(), _grid(dp=2), 2, 1, small).infeasible
    assert cost.step_cost(_shape(), _grid(x=2), 2, 1, small).infeasible == ""
    odd = cost.step_cost(_shape(), _grid(dp=2), 3, 1, UNIT)
    assert odd.infeasible == "global batch 3 does not split over dp*z = 2"
    ranked = cost.rank_grids(_shape(), 4, 4, small)
    flags = [bool(c.infeasible) for c in ranked]
    assert flags == sorted(flags) and any(flags) and not flags[0]


def test_ranking_is_deterministic() -> None:
    shape = shape_of(models.build("gpt2"), 16)
    grids = candidate_grids(8, shape.blocks)
    first = cost.rank_grids(shape, 8, 8, cost.load_hardware("h100"), grids=grids)
    random.Random(0).shuffle(grids)
    again = cost.rank_grids(shape, 8, 8, cost.load_hardware("h100-80g"), grids=grids)
    assert [c.sizes for c in first] == [c.sizes for c in again] and len(first) == len(grids)
    steps = [c.step for c in first if not c.infeasible]
    assert steps == sorted(steps)


def test_hardware_descriptions(tmp_path) -> None:
    assert cost.load_hardware("h200").memory == 141e9 and cost.load_hardware("a100").inter_bw == 25e9
    path = tmp_path / "mine.json"
    path.write_text('{"flops": 1e12, "memory": 1e10, "ranks_per_node": 4, "intra_bw": 1e10, '
                    '"inter_bw": 1e9, "latency": 1e-5}')
    assert cost.load_hardware(str(path)) == cost.Hardware("mine.json", 1e12, 1e10, 4, 1e10, 1e9, 1e-5)
    with pytest.raises(ValueError, match="unknown hardware 'tpu': use a preset"):
        cost.load_hardware("tpu")


@pytest.fixture
def fake_world():
    """Play one rank of an 8-rank world on torch's fake backend, in this process."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 - registers "fake"

    def join(rank: int) -> None:
        dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=8)
    yield join
    autopar.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("rank", [0, 5, 7])
def test_grid_auto_picks_the_top_grid_on_every_rank(fake_world, rank: int) -> None:
    expected = cost.rank_grids(shape_of(models.build("gpt2"), 16), 8, 8, cost.load_hardware("h100"))[0].sizes
    fake_world(rank)
    grid = autopar.init(grid="auto", model=models.build("gpt2"), hardware="h100", global_batch=8, seq_len=16)
    assert grid.sizes == expected and grid.rank == rank


def test_grid_auto_errors(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"init\(grid='auto'\) picks every size itself; drop pp"):
        autopar.init(pp=2, grid="auto", model="gpt2", hardware="h100", global_batch=8)
    with pytest.raises(ValueError, match="grid='auto' needs model=, global_batch= in autopar.init"):
        autopar.init(grid="auto", hardware="h100")
    monkeypatch.setenv("AUTOPAR_GRID", "auto")
    with pytest.raises(ValueError, match="grid='auto' needs model=, hardware=, global_batch="):
        autopar.init()
    with pytest.raises(ValueError, match=r"init\(grid='best'\): the only grid name is 'auto'"):
        autopar.init(grid="best")
    with pytest.raises(ValueError, match="grid='auto': no grid of 1 ranks can train this model"):
        cost.choose_grid(1, "gpt2", cost.dataclasses.replace(UNIT, memory=1.0), 8)


def test_plan_prints_the_ranking(capsys) -> None:
    from autopar.cli import main

    assert main(["plan", "--model", "gpt2", "--world", "16", "--hardware", "h100", "--global-batch", "64",
                 "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("hardware h100-80g: 247 TFLOP/s") and "step" in lines[2]
    assert lines[3].split()[:5] == ["1", "8", "2", "1", "1"] and lines[-1] == "... 66 more grids (--top)"


def test_run_grid_auto_hands_the_choice_to_the_ranks(capsys) -> None:
    from autopar.cli import main

    best = cost.choose_grid(8, "gpt2", "h100", 64, 128)
    assert main(["run", "-n", "8", "--grid", "auto", "--model", "gpt2", "--hardware", "h100", "--global-batch",
                 "64", "--seq-len", "128", "--dry-run", "train.py"]) == 0
    out = capsys.readouterr()
    grid = ",".join(f"{a}={n}" for a, n in best.sizes.items())
    assert f"--grid auto chose {grid}" in out.out and f"AUTOPAR_GRID={grid} " in out.err
    with pytest.raises(SystemExit):
        main(["run", "-n", "8", "--grid", "auto", "--dry-run", "train.py"])
    assert "--grid auto needs --model, --hardware, --global-batch" in capsys.readouterr().err


def test_attention_is_computed_whole_on_every_tensor_parallel_rank() -> None:
    # one block: an 8 x 8 weight plus attention over seq 4, hidden 8: 12 * 4 * 8 FLOPs per token,
    # 4 tokens. x=2 halves the weight's 6 * 64 * 4 but not the attention (full-feature activations).
    shape = Shape([Layer(8, 8, True)], 0, 0, 1, 8, 2, 4)
    assert cost.step_cost(shape, _grid(dp=1), 1, 1, UNIT).compute == 1536 + 1536
    assert cost.step_cost(shape, _grid(x=2), 1, 1, UNIT).compute == 768 + 1536
