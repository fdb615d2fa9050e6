"""Per-rank share of a MoE model's parameters under ``auto_parallelize``, against 1/(x*y*z) (issue 13.3).

8 gloo ranks build each model on the meta device (no memory, no init: only shapes matter) under
``autopar.auto_parallelize()`` on every grid in turn and count the elements of the parameters
they hold (depth pieces with their padding). Models, at their published sizes:

* Mixtral-8x7B (8 experts, top 2, 32 layers, 4096 wide, fused ``MixtralExperts``);
* Qwen1.5-MoE-A2.7B (60 experts, top 4, shared expert, 24 layers): 60 experts do not divide
  over x*y = 8, so there its experts stay whole (logged) and the share shows what that costs;
* Qwen3-30B-A3B (128 experts, top 8, 48 layers).

Columns: the fullest rank's share of all parameters, of the expert tensors, and the share the
same rank would hold with the experts whole (as before issue 13.3: every rank a full copy).

    OMP_NUM_THREADS=1 python bench/bench_moe.py
"""
from __future__ import annotations

import logging
import socket
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import autopar
from autopar.intra_layer.experts import ShardedExperts, is_fused_experts
from tables import table  # bench/ is on sys.path: the scripts run as files

WORLD = 8
GRIDS = {"x2": dict(x=2, dp=4), "x2y2": dict(x=2, y=2, dp=2), "x2z2": dict(x=2, z=2, dp=2),
         "x4y2": dict(x=4, y=2), "x2y2z2": dict(x=2, y=2, z=2)}


def _mixtral() -> transformers.PreTrainedModel:
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2))


def _qwen15() -> transformers.PreTrainedModel:
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632))


def _qwen3() -> transformers.PreTrainedModel:
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768))


MODELS: dict[str, Callable[[], transformers.PreTrainedModel]] = {
    "Mixtral-8x7B": _mixtral, "Qwen1.5-MoE-A2.7B": _qwen15, "Qwen3-30B-A3B": _qwen3}


def _shares(build: Callable[[], transformers.PreTrainedModel]) -> tuple[float, float, float, int]:
    """(share of all elements, of the expert elements, all with the experts whole, experts modules sharded)."""
    with torch.device("meta"), autopar.auto_parallelize():
        model = build()
    experts = [p for m in model.modules() if is_fused_experts(m) or isinstance(m, ShardedExperts)
               for p in m._parameters.values()]
    n_all, n_exp = sum(_full_numel(p) for p in model.parameters()), sum(_full_numel(p) for p in experts)
    local, local_exp = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in experts)
    sharded = sum(isinstance(m, ShardedExperts) for m in model.modules())
    return local / n_all, local_exp / n_exp, (local - local_exp + n_exp) / n_all, sharded


def _full_numel(p: torch.Tensor) -> int:
    spec = getattr(p, "_autopar_spec", None)
    return torch.Size(spec.full_shape).numel() if spec is not None else p.numel()


def _rank(rank: int, port: int, out: "mp.Queue") -> None:
    logging.getLogger("autopar").setLevel(logging.ERROR)  # the kept-whole lists are the point of the table
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=600))
    for name, build in MODELS.items():
        for grid, sizes in GRIDS.items():
            autopar.init(**sizes)
            out.put((name, grid, rank, _shares(build)))
            autopar.destroy()
    dist.destroy_process_group()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {}
    for _ in range(WORLD * len(MODELS) * len(GRIDS)):
        name, grid, _, shares = out.get(timeout=1200)
        results.setdefault((name, grid), []).append(shares)
    for p in procs:
        p.join()
    rows = []
    for (name, grid), ranks in results.items():
        s = {a: GRIDS[grid].get(a, 1) for a in ("x", "y", "z")}
        ideal = 1 / (s["x"] * s["y"] * s["z"])
        total, experts, before, sharded = max(ranks)
        rows.append([name, grid, f"{ideal:.4f}", f"{total:.4f}", f"{total / ideal:.2f}", f"{experts:.4f}",
                     f"{before:.4f}", f"{before / ideal:.2f}", "yes" if sharded else "no (E does not divide x*y)"])
    print(table("Per-rank share of the parameters, MoE models (fullest rank; 8 ranks, dp fills the rest)",
                ["model", "grid", "ideal 1/(x*y*z)", "share", "/ideal", "experts share", "experts whole: share",
                 "/ideal", "experts sharded"], rows))


if __name__ == "__main__":
    main()
