"""``autopar plan --dry-run`` (issue 16.2): one process plays a few ranks of a cluster-size job on
torch's fake backend, with the real groups, the real sharded model on meta and the real split.
The figures are checked against sizes computed here from ``ShardSpec`` alone, against ``plan``'s
count and against ``memory_report``."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from autopar.cli import main, models
from autopar.cli.dry_run import RankFigures, dry_run_rank
from autopar.intra_layer.layout import bias_spec, divisible, linear_weight_spec
from autopar.runtime.grid import resolve_sizes


def _llama_16_layers() -> nn.Module:
    """Llama-shaped, 16 blocks, small enough for the cluster-size test to trace in seconds (the
    Llama-7B table in bench/REPORT.md is ``--model llama``)."""
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16))


def _tiny_llama() -> nn.Module:
    return models.build("llama", tiny=True)


def _expected_local_numel(serial: nn.Module, held: set[str], sizes: dict[str, int]) -> int:
    """This rank's elements from the serial shapes and ShardSpec alone: a Linear / Embedding
    weight that divides over (y, x) keeps its local depth piece, its bias the y slice; every
    other parameter is whole."""
    tp = {a: sizes[a] for a in ("x", "y", "z")}
    total = 0
    for name, module in serial.named_modules():
        spec = None
        for pname, p in module.named_parameters(recurse=False):
            if f"{name}.{pname}" not in held:
                continue
            if pname == "weight" and type(module) in (nn.Linear, nn.Embedding):
                full = linear_weight_spec(tuple(p.shape), tp)
                spec = full if divisible(full.full_shape, full.dim_axes, tp) else None
                total += spec.local_numel if spec else p.numel()
            elif pname == "bias" and spec is not None and tp["y"] > 1:
                total += bias_spec(p.shape[0], tp).local_numel
            else:
                total += p.numel()
    return total


def test_16384_ranks_on_a_5d_grid(capsys) -> None:
    world, sizes = 16384, resolve_sizes(16384, pp=8, dp=256, x=2, y=2, z=2)
    start = time.perf_counter()
    figures = [dry_run_rank(world, sizes, r, _llama_16_layers, global_batch=1024, seq_len=256, microbatches=8, zero=1)
               for r in (0, world - 1)]
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"two ranks of a 16,384-rank dry run took {elapsed:.1f} s"
    assert not dist.is_initialized()
    with torch.device("meta"):
        serial = _llama_16_layers()
    first, last = figures
    assert first.coords == dict(pp=0, dp=0, z=0, y=0, x=0) and last.coords == dict(pp=7, dp=255, z=1, y=1, x=1)
    assert first.units[0] == "model.embed_tokens" and last.units[-1] == "lm_head"
    for f in figures:
        expected = _expected_local_numel(serial, set(f.held), sizes)
        assert f.params == expected and f.report.on_device["parameters"] == 4 * expected
        assert f.analytic["params"] == expected  # plan's count of the same stage agrees
        assert f.grads == 4 * expected  # buckets of this stage's size (ZeRO-1 keeps whole gradients)
        # ZeRO-1: each bucket's state is cut over dp (dp x z for the whole norms): about 1/256 of it
        assert 8 * expected / 512 < f.adamw <= 8 * expected / 256 * 1.01, f.adamw / (8 * expected)
        assert f.groups_made > world and f.groups_held == 31  # every nonempty axis combination: its own group
    # The traced split keeps 2 of the 16 blocks on each stage, as plan assumes.
    assert sum(u.startswith("model.layers.") for u in first.units) == 2
    assert first.even["params"] == pytest.approx(max(f.params for f in figures), rel=1e-4)


def test_world_8_rank_0_holds_what_a_real_run_holds() -> None:
    """World 8 on pp=2 x x=2 x y=2: the fake world is the same set-up an 8-rank run makes (the
    same init, model build and engine), so rank 0's figures must equal plan's count of stage 0
    and the ShardSpec sizes, and its stage must be the first half of the model."""
    sizes = resolve_sizes(8, pp=2, x=2, y=2)
    f: RankFigures = dry_run_rank(8, sizes, 0, _tiny_llama, global_batch=8, seq_len=32, microbatches=2, zero=0)
    with torch.device("meta"):
        serial = _tiny_llama()
    expected = _expected_local_numel(serial, set(f.held), sizes)
    assert f.units == ["model.embed_tokens", "model.layers.0"]
    assert all(n.startswith(("model.embed_tokens.", "model.layers.0.")) for n in f.held)
    assert f.params == expected == f.analytic["params"]
    assert f.report.on_device["parameters"] == 4 * expected and f.grads == 4 * expected
    assert f.adamw == 8 * expected  # no ZeRO: both moments of every element
    tokens = 8 * 32  # dp = z = 1: the whole global batch
    assert f.analytic["comm pp"] == 4 * tokens * serial.config.hidden_size  # the first stage only sends forward
    assert f.analytic["comm dp"] == 0 and f.analytic["comm z"] == 0 and f.analytic["comm x/y"] > 0
    assert f.whole == []


def test_the_table(capsys) -> None:
    assert main(["plan", "--dry-run", "--model", "gpt2", "--world", "64", "--grid", "pp=2,x=2,y=2,z=2",
                 "--ranks", "63", "--global-batch", "64", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 63 |")]
    assert len(rows) == 1 and "| 1,3,1,1,1 |" in rows[0] and "lm_head" in rows[0], out
    assert "on 64 ranks, pp=2 x dp=4 x z=2 x y=2 x x=2" in out
    # GPT-2's vocabulary (50257 rows) does not divide over y=2: the tied embedding and head stay whole
    assert "transformer.wte (Embedding (50257, 768)): weight (50257, 768) does not divide over ('y', 'x')" in out


@pytest.mark.parametrize("argv, message", [
    (["--world", "1000", "--grid", "pp=8,x=2,y=2,z=2"],
     "world size 1000 is not divisible by pp*x*y*z = 64 (pp=8, x=2, y=2, z=2)"),
    (["--world", "64", "--grid", "pp=2,dp=3,x=2"], "grid pp=2 dp=3 x=2 y=1 z=1 has 12 ranks but the world has 64"),
    (["--world", "64"], "--dry-run builds one grid: pass --grid, e.g. --grid pp=8,x=2,y=2,z=2 (dp is inferred)"),
    (["--world", "64", "--grid", "x=2", "--ranks", "0,64"], "--ranks [64]: a world of 64 ranks has ranks 0..63"),
    (["--world", "64", "--grid", "x=2", "--model", "no-such-model"], "--model 'no-such-model' is neither a family"),
    (["--world", "64", "--grid", "pp=0"], "bad grid entry 'pp=0' in 'pp=0'"),
])
def test_bad_grids_give_clear_errors(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["plan", "--dry-run", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not dist.is_initialized()


def test_a_hugging_face_config_folder_on_pp_1(tmp_path, capsys) -> None:
    _tiny_llama().config.save_pretrained(tmp_path)
    assert main(["plan", "--dry-run", "--model", str(tmp_path), "--world", "16", "--grid", "x=2,y=2,z=2",
                 "--global-batch", "16", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| 0 |", "| 15 |"))]
    assert [r[2] for r in rows] == ["all (pp=1)"] * 2, out
    assert rows[0][3] == rows[1][3] and rows[0][13:16] == ["=", "=", "params =, grads 0 until a step"], out


def _real_rank_holds() -> tuple[list[str], int, int, int, int]:
    """One rank of a real 8-rank gloo run on pp=2 x x=2 x y=2: what it holds after parallelize."""
    import autopar
    from autopar.offload.memory import memory_report

    autopar.init(pp=2, x=2, y=2)
    with autopar.auto_parallelize():
        model = _tiny_llama()
    engine = autopar.parallelize(model, optimizer=lambda params: torch.optim.AdamW(params), num_microbatches=2,
                                 sample_batch=models.make_batch(model, 2, seq=32))
    ids = {id(p) for p in engine.params}
    return ([n for n, p in model.named_parameters() if id(p) in ids], sum(p.numel() for p in engine.params),
            memory_report(engine).on_device["parameters"], engine.dp.held_grad_bytes(),
            8 * sum(p.numel() for p in engine.dp.optimizer_params))


def test_world_8_equals_a_real_8_rank_run(pool8) -> None:
    """The same figures from 8 real gloo processes (real tensors, real split) for ranks 0 and 7."""
    real = pool8.run(_real_rank_holds)
    sizes = resolve_sizes(8, pp=2, x=2, y=2)
    for rank in (0, 7):
        f = dry_run_rank(8, sizes, rank, _tiny_llama, global_batch=8, seq_len=32, microbatches=2, zero=0)
        assert (f.held, f.params, f.report.on_device["parameters"], f.grads, f.adamw) == tuple(real[rank])
