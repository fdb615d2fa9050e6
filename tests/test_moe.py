"""MoE experts under ``auto_parallelize`` (issue 13.3) against serial training.

Tiny Mixtral and Qwen2-MoE (fused 3-D expert tensors, E=4, top_k=2) and a plain MoE whose
experts are an ``nn.ModuleList`` of ``nn.Linear`` MLPs, on x=2, x2 x y2, dp2 x x2 and x2 x z2:
construction bit-identical to serial, then 3 AdamW steps compared with serial on the same
global batches: losses, the gradients of the first step (recorded by the optimizer before it
steps, gathered to full size) and the weights (``full_state_dict``), each tensor's error
relative to its own update. float64 uses the loss in the logits' dtype (HF's casts to fp32).
Each rank also reports its share of the model's and of the experts' elements. The serial
reference runs once per model and dtype in the test process; ranks start once per module.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import autopar
from autopar.intra_layer import gather_full, spec_of
from autopar.intra_layer.experts import ShardedExperts

VOCAB, GLOBAL, SEQ, STEPS = 64, 8, 8, 3
LR = 1e-2
GRIDS = {"x2": dict(x=2), "z2": dict(z=2), "x2y2": dict(x=2, y=2), "dp2x2": dict(dp=2, x=2), "x2z2": dict(x=2, z=2),
         "x2y2z2": dict(x=2, y=2, z=2), "pp2x2": dict(pp=2, x=2)}


def _mixtral(impl: str, experts: int = 4) -> nn.Module:
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                     num_local_experts=experts, num_experts_per_tok=2)
    cfg._experts_implementation = impl
    return transformers.MixtralForCausalLM(cfg)


def _qwen(impl: str) -> nn.Module:
    cfg = transformers.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=32, decoder_sparse_step=1)
    cfg._experts_implementation = impl
    return transformers.Qwen2MoeForCausalLM(cfg)


def _gpt_oss(impl: str) -> nn.Module:
    """gpt-oss: experts with biases, transposed weights, a clamped SwiGLU, and a forward whose
    arguments are named (hidden_states, router_indices, routing_weights) and whose eager code
    cannot take the expert-parallel sentinel id (``one_hot(num_classes=num_experts)``); before, its experts stayed whole."""
    cfg = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                    max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = impl
    return transformers.GptOssForCausalLM(cfg)


class ListMoE(nn.Module):
    """The older layout: a router ``nn.Linear`` and experts as an ``nn.ModuleList`` of MLPs.
    Every expert runs on every rank, on the (possibly empty) rows routed to it, so the z ranks,
    which see different tokens, still make the same weight gathers."""

    def __init__(self, impl: str, dim: int = 16, hidden: int = 32, experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
                                     for _ in range(experts))
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.top_k = top_k

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        h = self.embed(input_ids)
        flat = h.reshape(-1, h.shape[-1])
        weights, chosen = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out = out.index_add(0, token, expert(flat[token]) * weights[token, slot, None])
        return {"logits": self.head(h + out.view_as(h))}


BUILDERS: dict[str, Callable[[str], nn.Module]] = {"mixtral": _mixtral, "qwen2moe": _qwen, "gptoss": _gpt_oss,
                                                   "listmoe": ListMoE,
                                                   "mixtral3": lambda impl: _mixtral(impl, experts=3)}


def _build(name: str, dtype: torch.dtype, impl: str, parallel: bool) -> nn.Module:
    """``impl``: transformers' experts implementation ("eager" loops over the hit experts;
    "grouped_mm" / "batched_mm" run every routed pair at once, and have no float64 kernel)."""
    torch.manual_seed(0)
    if parallel:
        with autopar.auto_parallelize():
            model = BUILDERS[name](impl)
    else:
        model = BUILDERS[name](impl)
    return model.to(dtype)


def _batch(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def lm_loss(output: Any, batch: dict) -> torch.Tensor:
    """Mean next-token cross entropy in the logits' own dtype."""
    logits = output["logits"][:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))


def lm_items(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum()


class _Recording(torch.optim.AdamW):
    """AdamW that keeps the gradients its first step saw."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, lr=LR, eps=1e-6)
        self.first: dict[int, torch.Tensor] | None = None

    def step(self, closure: Any = None) -> Any:
        if self.first is None:
            self.first = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                          if p.grad is not None}
        return super().step(closure)


def _expert_params(model: nn.Module) -> set[str]:
    return {f"{n}.{k}" if n else k for n, m in model.named_modules()
            if isinstance(m, ShardedExperts) or type(m).__name__.endswith("Experts") for k in m._parameters}


def run_parallel(name: str, grid: dict, dtype: torch.dtype, impl: str, clip: float | None = None) -> dict | None:
    """On every rank: build under the grid, train; rank 0 returns the results (others None)
    with every rank's share of the elements (what its optimizer holds). With pp > 1 the
    gradients are not compared (each stage holds only its own)."""
    autopar.init(**grid)
    model = _build(name, dtype, impl, parallel=True)
    built = autopar.full_state_dict(model)
    experts = _expert_params(model)
    n_all = sum(v.numel() for v in built.values())
    n_exp = sum(v.numel() for k, v in built.items() if k in experts)
    named = dict(model.named_parameters())
    expert_ids = {id(p) for k, p in named.items() if k in experts}
    sharded = sorted(k for k, m in model.named_modules() if isinstance(m, ShardedExperts))
    whole_linears = sorted(k for k, m in model.named_modules()
                           if isinstance(m, nn.Linear) and k.startswith("experts.") and spec_of(m.weight) is None)
    pp = grid.get("pp", 1)
    engine = autopar.parallelize(model, optimizer=_Recording, loss_fn=lm_loss, loss_items=lm_items,
                                 num_microbatches=pp, clip_grad_norm=clip)
    losses = [engine.step(autopar.shard_batch(_batch(s))) for s in range(STEPS)]
    assert getattr(getattr(model, "config", None), "_experts_implementation", impl) == impl, \
        "the pipeline trace left its experts switch on"
    held = [p for g in engine.optimizer.param_groups for p in g["params"]]  # pp: split at the first step
    local_all, local_exp = sum(p.numel() for p in held), sum(p.numel() for p in held if id(p) in expert_ids)
    first, grads = engine.optimizer.first, None
    if pp == 1:
        grads = {k: (first[id(p)] if spec_of(p) is None else
                     gather_full(first[id(p)].reshape(-1), spec_of(p), engine.grid)).cpu() for k, p in named.items()}
    final = autopar.full_state_dict(engine)
    shares = [None] * engine.grid.world_size
    torch.distributed.all_gather_object(shares, (local_all / n_all, local_exp / max(n_exp, 1)))
    if engine.grid.rank != 0:
        return None
    return {"built": built, "final": final, "grads": grads, "losses": losses, "shares": shares,
            "sharded": sharded, "whole_linears": whole_linears}


@functools.cache
def serial(name: str, dtype: torch.dtype, impl: str, clip: float | None = None) -> dict:
    model = _build(name, dtype, impl, parallel=False)
    built = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-6)
    losses, grads = [], {}
    for s in range(STEPS):
        batch = _batch(s)
        loss = lm_loss(model(**batch), batch)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if s == 0:
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"built": built, "final": model.state_dict(), "grads": grads, "losses": losses}


def relative_errors(par: dict, ref: dict, start: dict | None) -> dict[str, float]:
    """||a - b|| / ||b - start|| per tensor (||b|| when ``start`` is None), zero-sized updates left out."""
    out = {}
    for key, b in ref.items():
        scale = (b - start[key]).norm() if start is not None else b.norm()
        if scale > 0:
            out[key] = float((par[key] - b).norm() / scale)
    return out


def check(name: str, grid: str, dtype: torch.dtype, impl: str, pool: Any, clip: float | None = None) -> dict:
    """``clip``: clip_grad_norm on both sides; the gradients compared are then the clipped ones."""
    got = pool.run(run_parallel, name, GRIDS[grid], dtype, impl, clip, timeout=600)[0]
    ref = serial(name, dtype, impl, clip)
    case = f"{name} {grid} {dtype} {impl} clip={clip}"
    assert got["built"].keys() == ref["built"].keys(), got["built"].keys() ^ ref["built"].keys()
    for key, v in ref["built"].items():
        assert torch.equal(got["built"][key], v), f"{case}: {key} differs from the serial construction"
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    loss_tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=loss_tol,
                               atol=loss_tol, msg=lambda m: f"{case}: losses {got['losses']} vs {ref['losses']}")
    worst = {}
    for kind, par, want, start in (("gradient", got["grads"], ref["grads"], None),
                                   ("weight", got["final"], ref["final"], ref["built"])):
        if par is None:  # pp > 1: no gradients to compare
            continue
        limit = tol  # clipped too: the global norm is summed in the gradients' dtype (float64)
        errors = relative_errors(par, want, start)
        key = max(errors, key=errors.get)
        assert errors[key] < limit, f"{case}: {kind} of {key} off by {errors[key]:.2e} (limit {limit})"
        worst[kind] = f"{errors[key]:.1e}"
    return {**got, "grad": worst.get("gradient", "n/a"), "weight": worst["weight"]}


def _ideal(grid: str) -> float:
    sizes = GRIDS[grid]
    return 1 / (sizes.get("x", 1) * sizes.get("y", 1) * sizes.get("z", 1) * sizes.get("pp", 1))


def _report(name: str, grid: str, dtype: torch.dtype, impl: str, result: dict) -> None:
    print(f"{name} {grid} {dtype} {impl}: gradient err {result['grad']}, weight err {result['weight']}, "
          f"share per rank {[round(a, 3) for a, _ in result['shares']]} (ideal {_ideal(grid):.3f})")


CASES = [(name, grid, dtype, "eager" if dtype == torch.float64 else "grouped_mm") for name in ("mixtral", "qwen2moe")
         for grid in ("x2", "x2y2", "dp2x2", "x2z2") for dtype in (torch.float64, torch.float32)] + \
        [("mixtral", "x2y2", torch.float32, "batched_mm"), ("mixtral", "x2z2", torch.float32, "eager"),
         ("gptoss", "x2y2", torch.float64, "eager"), ("gptoss", "x2y2", torch.float32, "grouped_mm")]


@pytest.mark.parametrize("name,dtype,impl", [("mixtral", torch.float64, "eager"),
                                             ("mixtral", torch.float32, "grouped_mm"),
                                             ("qwen2moe", torch.float64, "eager")], ids=str)
def test_fused_experts_in_a_pipeline(pool4, name, dtype, impl):
    """pp=2 x x=2 with the implementations users configure: the pipeline traces each unit on fake
    tensors, where eager's ``nonzero`` (a data-dependent shape) and CPU ``grouped_mm`` (no fake
    kernel for fp32) cannot run, so the trace switches them to ``batched_mm`` (before, both
    raised UntraceableModel, whose advice was split_points)."""
    result = check(name, "pp2x2", dtype, impl, pool4)
    assert result["sharded"], f"{name} pp2x2: no experts module was sharded"
    for _, experts in result["shares"]:  # each stage holds half the layers, each cut over x
        assert experts == pytest.approx(0.25), f"{name} pp2x2: experts share {experts} vs 0.25"
    _report(name, "pp2x2", dtype, impl, result)


@pytest.mark.parametrize("name,grid,dtype,impl", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_fused_experts_equal_serial(pool2, pool4, name, grid, dtype, impl):
    result = check(name, grid, dtype, impl, pool2 if grid == "x2" else pool4)
    assert result["sharded"], f"{name} {grid}: no experts module was sharded"
    for _, experts in result["shares"]:  # every rank holds exactly 1/(x*y*z) of each expert tensor
        assert experts == pytest.approx(_ideal(grid)), f"{name} {grid}: experts share {experts} vs {_ideal(grid)}"
    _report(name, grid, dtype, impl, result)


@pytest.mark.parametrize("grid", ["x2y2", "x2z2"])
def test_clipping_counts_each_expert_once(pool4, grid):
    """A clip well below the gradient norm: the global norm must be the serial one (each expert
    counted once), so clipped float64 gradients and weights equal serial at 1e-9."""
    result = check("mixtral", grid, torch.float64, "eager", pool4, clip=0.05)
    _report("mixtral", grid, torch.float64, "eager clip=0.05", result)


def test_fused_experts_on_2x2x2_equal_serial(pool8):
    result = check("mixtral", "x2y2z2", torch.float64, "eager", pool8)
    for _, experts in result["shares"]:
        assert experts == pytest.approx(1 / 8), f"experts share {experts} vs 1/8"
    _report("mixtral", "x2y2z2", torch.float64, "eager", result)


@pytest.mark.parametrize("grid", ["x2", "x2y2", "dp2x2", "x2z2"])
def test_module_list_experts_are_sharded_as_linear_layers(pool2, pool4, grid):
    result = check("listmoe", grid, torch.float64, "eager", pool2 if grid == "x2" else pool4)
    assert not result["whole_linears"], f"expert Linear layers left whole: {result['whole_linears']}"
    _report("listmoe", grid, torch.float64, "eager", result)


def test_experts_that_do_not_divide(pool2):
    """3 experts: whole under x=2 (logged), depth-sharded under z=2; both exact."""
    whole = check("mixtral3", "x2", torch.float64, "eager", pool2)
    assert not whole["sharded"], f"3 experts were sharded over x=2: {whole['sharded']}"
    depth = check("mixtral3", "z2", torch.float64, "eager", pool2)
    assert depth["sharded"] and all(e == pytest.approx(0.5) for _, e in depth["shares"]), depth["shares"]
    pool2.run(raise_strict)


def raise_strict() -> None:
    autopar.init(x=2)
    with pytest.raises(ValueError, match=r"MixtralExperts.*3 experts do not divide over x\*y = 2"):
        with autopar.auto_parallelize(strict=True):
            model = _mixtral("eager", experts=3)  # kept alive: the block only sees live parameters
    assert not isinstance(model.model.layers[0].mlp.experts, ShardedExperts)


def train_and_reshard(folder: str) -> dict | None:
    """Step 0 on x2 x z2, saved (checkpoint and HF folder); steps 1-2 on x2 x y2 after loading;
    the HF folder read back by ``autopar.from_pretrained`` (each rank reads its slices) on both."""
    batches = [_batch(s) for s in range(STEPS)]
    autopar.init(x=2, z=2)
    engine = autopar.parallelize(_build("mixtral", torch.float64, "eager", parallel=True), optimizer=_Recording,
                                 loss_fn=lm_loss, loss_items=lm_items)
    losses = [engine.step(autopar.shard_batch(batches[0]))]
    autopar.save_checkpoint(engine, f"{folder}/ckpt")
    autopar.save_pretrained(engine, f"{folder}/hf")
    saved = autopar.full_state_dict(engine)
    depth = autopar.full_state_dict(autopar.from_pretrained(transformers.MixtralForCausalLM, f"{folder}/hf",
                                                            dtype=torch.float64))
    autopar.destroy()
    autopar.init(x=2, y=2)
    engine = autopar.parallelize(_build("mixtral", torch.float64, "eager", parallel=True), optimizer=_Recording,
                                 loss_fn=lm_loss, loss_items=lm_items)
    autopar.load_checkpoint(engine, f"{folder}/ckpt")
    loaded = autopar.full_state_dict(engine)
    losses += [engine.step(autopar.shard_batch(b)) for b in batches[1:]]
    final = autopar.full_state_dict(engine)
    pretrained = autopar.full_state_dict(autopar.from_pretrained(transformers.MixtralForCausalLM, f"{folder}/hf",
                                                                 dtype=torch.float64))
    if engine.grid.rank != 0:
        return None
    return {"saved": saved, "loaded": loaded, "losses": losses, "final": final, "pretrained": (depth, pretrained)}


def test_checkpoint_reshards_experts(pool4, tmp_path):
    got = pool4.run(train_and_reshard, str(tmp_path))[0]
    for key, v in got["saved"].items():
        assert torch.equal(got["loaded"][key], v), f"{key} changed through the checkpoint"
        for grid, read in zip(("x2z2", "x2y2"), got["pretrained"]):
            assert torch.equal(read[key], v), f"{key} changed through save_pretrained + from_pretrained on {grid}"
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64).state_dict()
    for key, v in got["saved"].items():
        assert torch.equal(hf[key], v), f"{key}: the HF folder differs from full_state_dict"
    ref = serial("mixtral", torch.float64, "eager")
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-12, atol=1e-12)
    errors = relative_errors(got["final"], ref["final"], ref["built"])
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-9, f"{worst} off by {errors[worst]:.2e} after resharding x2z2 -> x2y2"


def expert_blocks_regathered(impl: str, dtype: torch.dtype) -> dict:
    """x2 x z2, both ``reshard_after_forward`` settings, 3 steps each: the losses, the bytes of the
    distinct storages the third step's forward saved for backward (all of them, as seen from
    outside the experts), the experts' gathered-block bytes, and the most regathered buffers
    alive at once in backward."""
    from autopar.intra_layer import regather
    from autopar.intra_layer.layers import Embedding, ShardedModule

    autopar.init(x=2, z=2)
    out = {}
    for reshard in (True, False):
        instances, most = [], [0]
        real_init, real_gather = regather.BlockRegather.__init__, regather.BlockRegather.gather_all

        def init(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            instances.append(self)

        def gather_all(self):
            real_gather(self)
            most[0] = max(most[0], sum(len(r._again) for r in instances))

        regather.BlockRegather.__init__, regather.BlockRegather.gather_all = init, gather_all
        try:
            torch.manual_seed(0)
            with autopar.auto_parallelize(reshard_after_forward=reshard):
                model = BUILDERS["mixtral"](impl).to(dtype)
            pieces = [p for m in model.modules() if isinstance(m, ShardedExperts)
                      for p in m._parameters.values() if spec_of(p) is not None and spec_of(p).depth]
            # A Linear saves its z piece instead of its gathered block (comm.depth_matmul).
            linear = [m.weight for m in model.modules() if isinstance(m, ShardedModule)
                      and not isinstance(m, Embedding) and spec_of(m.weight) is not None and spec_of(m.weight).depth]
            engine = autopar.parallelize(model, optimizer=_Recording, loss_fn=lm_loss, loss_items=lm_items)
            storages: dict[int, torch.Tensor] = {}  # kept alive, so no address is reused for another

            def pack(t: torch.Tensor) -> torch.Tensor:
                # Detached: for an op that saves its own output (log_softmax), the output would
                # hold its node and the node the output, a C++ cycle the GC cannot break.
                t = t.detach()
                storages[t.untyped_storage().data_ptr()] = t
                return t

            losses = []
            for s in range(STEPS):
                storages.clear()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    losses.append(engine.step(autopar.shard_batch(_batch(s))))
        finally:
            regather.BlockRegather.__init__, regather.BlockRegather.gather_all = real_init, real_gather
        out[reshard] = {"losses": losses, "saved": sum(t.untyped_storage().nbytes() for t in storages.values()),
                        "most": most[0],
                        "blocks": sum(p.numel() * 2 * p.element_size() for p in pieces), "pieces": len(pieces),
                        "linear": sum(p.numel() * p.element_size() for p in linear)}
    return out


@pytest.mark.parametrize("impl,dtype", [("eager", torch.float64), ("grouped_mm", torch.float32)], ids=str)
def test_expert_blocks_gathered_again_in_backward(pool4, impl, dtype):
    """Re-gathering (the default) frees every experts module's gathered z blocks after its forward:
    the saved storages shrink by exactly the blocks' bytes (2 layers, each a gate_up and a down
    block, z=2) plus, for the Linear layers, a block less a piece each; backward holds one
    module's blocks at a time, and the numbers do not change."""
    for got in pool4.run(expert_blocks_regathered, impl, dtype):
        again, kept = got[True], got[False]
        assert again["losses"] == kept["losses"], (again["losses"], kept["losses"])
        assert again["pieces"] == 4 and kept["saved"] - again["saved"] == again["blocks"] + again["linear"], (again, kept)
        assert again["most"] == 2 and kept["most"] == 0, (again, kept)
    torch.testing.assert_close(torch.tensor(again["losses"]), torch.tensor(serial("mixtral", dtype, impl)["losses"]),
                               rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
