"""3D tensor parallelism against serial training, on 8 gloo ranks.

Each rank function loops over the grids itself (one pool, many grids) and, on every rank,
builds the serial reference from the same seed and runs it on the same global batch. Checks:
construction bit-identical to serial, 3 optimizer steps equal to serial (losses and the weights
gathered by ``full_state_dict``), with and without clipping.

AdamW runs use ``eps=1e-5``: attention key biases have an identically zero gradient (softmax
ignores a per-row shift), so serial and parallel both hold ~1e-9 rounding noise there, which
the default ``eps=1e-8`` would blow up into lr-sized, order-dependent updates.
"""
from __future__ import annotations

import logging
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import autopar
import intra_layer_models as models
from autopar.intra_layer import spec_of

OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
              "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1e-5, weight_decay=0.01)}


def _build(name: str, parallel: bool, seed: int = 1, chain: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    if not parallel:
        return models.BUILDERS[name]()
    with autopar.auto_parallelize(chain=chain):
        return models.BUILDERS[name]()


def _assert_state_equal(par: nn.Module, ser: nn.Module, exact: bool) -> None:
    full, serial = autopar.full_state_dict(par), ser.state_dict()
    assert full.keys() == serial.keys(), full.keys() ^ serial.keys()
    for k, v in serial.items():
        if exact:
            assert torch.equal(full[k], v), f"{k} differs from the serial construction"
        else:
            torch.testing.assert_close(full[k], v, msg=lambda m, k=k: f"{k}: {m}")


def _train(name: str, opt: str, clip: float | None,
           chained: bool = False) -> tuple[list[tuple[float, float]], nn.Module]:
    """Build both models, check init, run 3 steps on both; returns (parallel, serial) losses and
    the parallel model. ``chained``: the sharded layout between consecutive layers set by hand
    (else, as by default, the automatic detection picks it at the first forward)."""
    ser, par = _build(name, False), _build(name, True)
    if chained:
        models.chain_layers(name, par)
    _assert_state_equal(par, ser, exact=True)
    data = models.batch(name)
    loss_fn = models.lm_loss if name in ("mlp", "sequential", "unchainable") else None
    engine = autopar.parallelize(par, OPTIMIZERS[opt], loss_fn=loss_fn, clip_grad_norm=clip)
    serial_opt = OPTIMIZERS[opt](ser.parameters())
    losses = []
    for _ in range(3):
        loss = engine.step(autopar.shard_batch(data))
        ser.train()
        out = ser(*data[:1]) if loss_fn else ser(**data)
        ref = loss_fn(out, data) if loss_fn else out.loss
        ref.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ser.parameters(), clip)
        serial_opt.step()
        serial_opt.zero_grad()
        losses.append((loss, ref.item()))
    torch.testing.assert_close(torch.tensor([p for p, _ in losses]), torch.tensor([s for _, s in losses]))
    _assert_state_equal(par, ser, exact=False)
    return losses, par


def train_on_grids(name: str, runs: list[tuple[tuple[int, int, int], str, float | None]],
                   chained: bool = False) -> list[float]:
    times = []
    for (x, y, z), opt, clip in runs:
        start = time.perf_counter()
        autopar.init(x=x, y=y, z=z)
        try:
            _train(name, opt, clip, chained)
        except AssertionError as e:
            raise AssertionError(f"{name} on x={x} y={y} z={z} with {opt} clip={clip}: {e}") from e
        finally:
            autopar.destroy()
        times.append(time.perf_counter() - start)
    return times


# Runs are ((x, y, z), optimizer, clip_grad_norm); dp = 8 / (x*y*z), so (2, 2, 1) has dp=2.
# Every grid, alternating optimizers and clipping; the second model gets the other optimizer on
# each grid, so every (grid, optimizer) pair runs once.
PLAIN_RUNS = [((2, 1, 1), "sgd", None), ((1, 2, 1), "adamw", 0.5), ((1, 1, 2), "sgd", 0.05),
              ((2, 2, 1), "adamw", 0.5), ((2, 1, 2), "sgd", None), ((2, 2, 2), "adamw", 0.5)]
OTHER = {"sgd": "adamw", "adamw": "sgd"}


@pytest.mark.parametrize("name", ["mlp", "sequential"])
def test_plain_models_equal_serial(pool8, name):
    runs = PLAIN_RUNS if name == "mlp" else [(g, OTHER[o], 0.5 if o == "sgd" else None) for g, o, _ in PLAIN_RUNS]
    pool8.run(train_on_grids, name, runs, timeout=600)


# Every HF model on the full 2x2x2 grid plus one more grid, rotated over the list (the whole
# matrix would take ~10 min on 2 cores; the plain models above cover it).
HF_RUNS = {
    "gpt2": [((2, 2, 2), "adamw", 0.5), ((1, 2, 1), "sgd", 0.05)],
    "llama": [((2, 2, 2), "adamw", 0.5), ((2, 1, 2), "sgd", None)],
    "opt": [((2, 2, 2), "adamw", 0.5), ((2, 1, 1), "sgd", 0.05)],
    "bert": [((2, 2, 2), "adamw", 0.5), ((2, 2, 1), "sgd", None)],
    "vit": [((2, 2, 2), "adamw", 0.5), ((1, 1, 2), "sgd", 0.05)],
    "gpt_neo": [((2, 2, 2), "sgd", 0.05), ((2, 2, 1), "adamw", 0.5)],
}


@pytest.mark.parametrize("name", list(HF_RUNS))
def test_hf_models_equal_serial(pool8, name):
    pool8.run(train_on_grids, name, HF_RUNS[name], timeout=600)


@pytest.mark.parametrize("name, runs", [
    ("mlp", [((2, 1, 1), "adamw", 0.5), ((2, 2, 1), "sgd", None), ((1, 2, 2), "adamw", None)]),
    ("llama", [((2, 2, 2), "adamw", 0.5), ((2, 1, 2), "sgd", 0.05)]),
])
def test_sharded_layout_equals_serial(pool8, name, runs):
    pool8.run(train_on_grids, name, runs, chained=True, timeout=600)


def chain_saves_communication():
    from autopar.intra_layer.comm import COUNTER

    autopar.init(x=2, y=2, z=2)
    volume = []
    for layout in ("default", "by hand", "automatic"):
        model = _build("mlp", True, chain=layout == "automatic")
        if layout == "by hand":
            models.chain_layers("mlp", model)
        ids = autopar.shard_batch(models.batch("mlp")[0])
        model(ids).sum().backward()  # the first forward is where the automatic layout is chosen
        COUNTER.reset()
        COUNTER.enabled = True
        model(ids).sum().backward()
        COUNTER.enabled = False
        volume.append(dict(COUNTER.bytes))
        assert model.up.out_sharded == model.down.in_sharded == (layout != "default")
    return volume


def test_sharded_layout_skips_the_relayout(pool8):
    default, chained, automatic = pool8.run(chain_saves_communication)[0]
    # Gone: the forward all-gather of up's output over y and the backward all-gather of down's
    # input gradient over x, each (tokens x 32) fp32 over 2 ranks; the rest only swaps axes.
    # The swapped consumer (down: output over x) all-gathers its y-cut bias (16 over 2) instead.
    tokens = 8 // 2 * 6  # batch 8 over dp*z = 2, sequence 6
    bias_gather = 4 * 16 / 2
    assert sum(default.values()) - sum(chained.values()) == pytest.approx(2 * 4 * tokens * 32 / 2 - bias_gather)
    assert automatic == chained  # the detection finds the same chain (down -> head: down is taken)


# (model, grid, optimizer, clip) trained with the automatic layout; which layers must be chained.
AUTO_RUNS = [("sequential", (2, 2, 1), "adamw", 0.5), ("sequential", (2, 2, 2), "sgd", None),
             ("llama", (2, 2, 1), "sgd", 0.05), ("llama", (2, 2, 2), "adamw", 0.5),
             ("unchainable", (2, 2, 2), "adamw", 0.5), ("unchainable", (2, 1, 1), "sgd", None)]


def _chained_layers(model: nn.Module) -> dict[str, str]:
    from autopar.intra_layer import ShardedModule

    return {name: ("in" if m.in_sharded else "") + ("out" if m.out_sharded else "")
            for name, m in model.named_modules() if isinstance(m, ShardedModule) and (m.in_sharded or m.out_sharded)}


def automatic_chains():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("autopar").addHandler(handler)
    found = []
    try:
        for name, (x, y, z), opt, clip in AUTO_RUNS:
            autopar.init(x=x, y=y, z=z)
            try:
                found.append(_chained_layers(_train(name, opt, clip)[1]))
            except AssertionError as e:
                raise AssertionError(f"{name} on x={x} y={y} z={z}: {e}") from e
            finally:
                autopar.destroy()
    finally:
        logging.getLogger("autopar").removeHandler(handler)
    return found, [r.getMessage() for r in records if "chain(s)" in r.getMessage()]


def test_automatic_sharded_layout_equals_serial(pool8):
    results = pool8.run(automatic_chains, timeout=600)
    found, logs = results[0]
    assert all(f == found for f, _ in results)
    mlp = {"1": "out", "3": "in"}  # Linear -> GELU -> Linear; 3 -> Tanh -> 5 is left: 3 is taken
    llama = {f"model.layers.{i}.mlp.{p}": r for i in range(2)
             for p, r in (("gate_proj", "out"), ("up_proj", "out"), ("down_proj", "in"))}  # not q/k/v -> o
    llama["lm_head"] = "out"  # not a chain: y = 2 gives the loss its vocabulary shards (vocab_loss)
    assert found == [mlp, mlp, llama, llama, {}, {}]
    assert len(logs) == 4 and "model.layers.0.mlp.gate_proj + model.layers.0.mlp.up_proj -> " \
                                "model.layers.0.mlp.down_proj" in logs[2]
    assert all(not r[1] for r in results[1:])  # logged by rank 0 only


class Reversed(nn.Module):
    """Registered in the opposite order to the one it runs in."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(24, 8)
        self.first = nn.Linear(8, 24)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.first(h)))


def prefetch_in_execution_order():
    autopar.init(x=2, y=1, z=2)
    torch.manual_seed(0)
    ser = Reversed()
    torch.manual_seed(0)
    with autopar.auto_parallelize():
        par = Reversed()
    data = torch.randn(8, 8)
    engine = autopar.parallelize(par, OPTIMIZERS["adamw"], loss_fn=lambda out, b: out.square().mean())
    serial_opt = OPTIMIZERS["adamw"](ser.parameters())
    for _ in range(3):
        engine.step(autopar.shard_batch(data))
        ser(data).square().mean().backward()
        serial_opt.step()
        serial_opt.zero_grad()
    _assert_state_equal(par, ser, exact=False)
    prefetcher = par.first.prefetcher
    assert prefetcher.order == [par.first, par.last] and not prefetcher.recording
    return prefetcher.hits


def test_depth_gathers_prefetched_in_execution_order(pool8):
    assert pool8.run(prefetch_in_execution_order) == [2] * 8  # steps 2 and 3 find `last` prefetched


def layers_and_tags(x, y, z):
    """Layer types, tags and the tied GPT-2 head on one grid."""
    from transformers.pytorch_utils import Conv1D

    autopar.init(x=x, y=y, z=z)
    model = _build("gpt2", True)
    assert model.lm_head.weight is model.transformer.wte.weight, "the tie did not survive sharding"
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, Conv1D) and type(attn) is not Conv1D
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.transformer.wte, nn.Embedding)
    spec = spec_of(attn.weight)
    assert spec.full_shape == (16, 48) and spec.dim_axes == ("x", "y")
    assert attn.weight.shape == (16 * 48 // (x * y * z),)
    assert attn.weight._autopar_grad_axes == ("dp",) and attn.weight._autopar_shard_axes == spec.axes
    # the bias is cut over y with the output features; its x and z ranks hold equal copies
    assert attn.bias.shape == (48 // y,) and (spec_of(attn.bias) is not None) == (y > 1)
    assert attn.bias._autopar_grad_axes == ("dp", "z")
    assert getattr(attn.bias, "_autopar_shard_axes", ()) == (("y",) if y > 1 else ())
    return spec.axes


def test_tied_bias_stays_whole_and_tied(pool8):
    """BERT's MLM decoder bias is ``cls.predictions.bias``, held by a module that is no parallel
    layer: it must stay one whole tensor (sharding it would silently untie it)."""
    assert pool8.run(tied_bias_whole)[0]


def tied_bias_whole():
    autopar.init(x=2, y=2, z=2)
    model = _build("bert", True)
    head = model.cls.predictions
    assert head.decoder.bias is head.bias and spec_of(head.bias) is None and head.bias.shape == (models.V,)
    assert head.bias._autopar_grad_axes == ("dp", "z", "y")
    sliced = [m.bias for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None
              and spec_of(m.bias) is not None]
    assert sliced, "the other biases are cut over y"
    return True


def test_layers_tags_and_tie(pool8):
    assert pool8.run(layers_and_tags, 2, 2, 2)[0] == ("z", "y", "x")
    assert pool8.run(layers_and_tags, 1, 2, 1)[0] == ("y",)


def non_divisible(strict: bool):
    autopar.init(x=2, y=2, z=2)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("autopar").addHandler(handler)
    try:
        def build():
            return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5), nn.Linear(5, 16))

        torch.manual_seed(0)
        ser = build()
        torch.manual_seed(0)
        try:
            with autopar.auto_parallelize(strict=strict):
                par = build()
        except ValueError as e:
            return str(e)
    finally:
        logging.getLogger("autopar").removeHandler(handler)
    assert spec_of(par[0].weight) is not None
    assert spec_of(par[2].weight) is None and spec_of(par[3].weight) is None
    _assert_state_equal(par, ser, exact=True)
    ids = torch.randn(8, 16)
    engine = autopar.parallelize(par, OPTIMIZERS["sgd"], loss_fn=lambda out, b: out.square().mean())
    serial_opt = OPTIMIZERS["sgd"](ser.parameters())
    for _ in range(2):
        engine.step(autopar.shard_batch(ids))
        ser(ids).square().mean().backward()
        serial_opt.step()
        serial_opt.zero_grad()
    _assert_state_equal(par, ser, exact=False)
    return [r.getMessage() for r in records]


def test_non_divisible_layers_stay_replicated_and_are_logged(pool8):
    logs = pool8.run(non_divisible, False)
    assert len(logs[0]) == 1 and "2 layer(s) stay replicated" in logs[0][0] and "(5, 8)" in logs[0][0]
    assert all(not log for log in logs[1:])  # logged once, by rank 0
    for message in pool8.run(non_divisible, True):
        assert "stay replicated" in message and "strict=False" in message


def from_pretrained(folder: str):
    import transformers as tf

    autopar.init(x=2, y=2, z=2)
    if dist.get_rank() == 0:
        _build("llama", False, seed=5).save_pretrained(os.path.join(folder, "llama"))
        _build("gpt2", False, seed=5).save_pretrained(os.path.join(folder, "gpt2"))
    dist.barrier()
    for name, cls in (("llama", tf.LlamaForCausalLM), ("gpt2", tf.GPT2LMHeadModel)):
        serial = cls.from_pretrained(os.path.join(folder, name))
        with autopar.auto_parallelize():
            par = cls.from_pretrained(os.path.join(folder, name))
        _assert_state_equal(par, serial, exact=True)
        # load_state_dict of full tensors into the sharded model
        torch.manual_seed(9)
        fresh = _build(name, True, seed=9)
        fresh.load_state_dict(serial.state_dict())
        _assert_state_equal(fresh, serial, exact=True)


def test_from_pretrained_and_full_load_state_dict(pool8, tmp_path):
    pool8.run(from_pretrained, str(tmp_path))


def meta_materialize():
    autopar.init(x=2, y=2, z=2)
    from autopar.intra_layer import materialize

    ser = _build("sequential", False)
    torch.manual_seed(1)
    with torch.device("meta"), autopar.auto_parallelize():
        par = models.sequential()
    assert par[1].weight.is_meta and par[1].weight.numel() == 16 * 24 // 8
    torch.manual_seed(1)
    materialize(par)
    _assert_state_equal(par, ser, exact=True)


def test_meta_device_then_materialize(pool8):
    pool8.run(meta_materialize)


def context_semantics():
    autopar.init(x=2, y=1, z=1)
    from autopar.intra_layer import Linear as ParallelLinear

    with pytest.raises(RuntimeError, match="boom"):
        with autopar.auto_parallelize():
            assert type(nn.Linear(4, 4)) is ParallelLinear
            raise RuntimeError("boom")
    assert type(nn.Linear(4, 4)) is nn.Linear  # the block is over
    with autopar.auto_parallelize():
        outer = nn.Linear(4, 4)
        with autopar.auto_parallelize():
            inner = models.Linear(4, 4)
        assert spec_of(inner.weight) is not None and spec_of(outer.weight) is None
        after = nn.Linear(4, 4)
    assert spec_of(outer.weight) is not None and spec_of(after.weight) is not None
    mha = nn.MultiheadAttention(4, 2)  # its out_proj is a Linear subclass: never swapped
    with autopar.auto_parallelize():
        mha = nn.MultiheadAttention(4, 2)
    assert spec_of(mha.out_proj.weight) is None
    return True


def test_context_manager_nests_and_exits_on_exceptions(pool8):
    assert all(pool8.run(context_semantics))


def test_not_initialised_raises():
    with pytest.raises(RuntimeError, match="autopar.init"):
        with autopar.auto_parallelize():
            pass


def _fp64_lm_loss(output: object, batch: dict) -> torch.Tensor:
    """GPT-2's causal LM loss in the logits' dtype (HF's casts float64 logits to fp32)."""
    logits = output.logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))


def _saved_bytes(engine: autopar.Engine, data: object, params: set[int]) -> tuple[float, int]:
    """One step's loss and the bytes its forward saved for backward, parameters aside."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params:
            saved[0] += t.numel() * t.element_size()
        return t.detach()  # kept as itself, a saved output would hold its own grad_fn: a leak

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = engine.step(autopar.shard_batch(data))
    return loss, saved[0]


def depth_regather(name: str) -> dict[str, float]:
    """dp=2 x x=2 x z=2 in float64: the default (block gathered again in backward) and
    ``reshard_after_forward=False`` both equal serial; only the second saves the blocks, and the
    difference is exactly one block per sharded matmul call. Under bf16 the two agree bit for
    bit and the z gathers move bf16."""
    from autopar.intra_layer.comm import COUNTER
    from autopar.intra_layer.layers import Embedding, ShardedModule

    data = models.batch(name)
    loss_fn = models.lm_loss if name == "mlp" else _fp64_lm_loss
    torch.manual_seed(1)
    ser = models.BUILDERS[name]().double()
    start = {k: v.clone() for k, v in ser.state_dict().items()}
    opt = torch.optim.AdamW(ser.parameters(), lr=1e-2, eps=1e-5)
    ref_losses = []
    for _ in range(3):
        ref = loss_fn(ser(data[0]) if name == "mlp" else ser(**data), data)
        ref.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(ref.item())
    ref_state = ser.state_dict()
    out: dict[str, float] = {}
    for reshard, precision in ((True, "fp32"), (False, "fp32"), (True, "bf16"), (False, "bf16")):
        autopar.init(x=2, z=2)
        try:
            torch.manual_seed(1)
            with autopar.auto_parallelize(reshard_after_forward=reshard):
                par = models.BUILDERS[name]()
            if precision == "fp32":
                par.double()
            engine = autopar.parallelize(par, lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1e-5),
                                         loss_fn=loss_fn, precision=precision)
            layers = [m for m in par.modules() if isinstance(m, ShardedModule) and spec_of(m.weight) is not None]
            block = {id(m): math.prod(spec_of(m.weight).block_shape) for m in layers}
            called = [0, 0]  # block elements of this step's sharded matmul / embedding calls

            def count(module: nn.Module, *_: object) -> None:
                called[isinstance(module, Embedding)] += block[id(module)]

            hooks = [m.register_forward_hook(count) for m in layers]
            params = {id(p) for p in par.parameters()}
            COUNTER.reset()
            losses, saved, blocks = [], [], []
            for step in range(3):
                COUNTER.enabled = step == 2  # the first step also finds the chains
                called[:] = [0, 0]
                loss, nbytes = _saved_bytes(engine, data, params)
                losses.append(loss)
                saved.append(nbytes)
                blocks.append(tuple(called))
            COUNTER.enabled = False
            for h in hooks:
                h.remove()
            key = f"{reshard}-{precision}"
            out[f"saved-{key}"], (out[f"blocks-{key}"], out[f"lookups-{key}"]) = saved[-1], blocks[-1]
            out[f"gather-bytes-{key}"] = COUNTER.bytes.get("all_gather[z]", 0.0)
            out[f"losses-{key}"] = losses
            if precision == "fp32":
                torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-12, atol=1e-12)
                full = autopar.full_state_dict(engine)
                worst = max(float((full[k] - v).norm() / (v - start[k]).norm())
                            for k, v in ref_state.items() if (v - start[k]).norm() > 0)
                assert worst < 1e-9, f"{name} reshard={reshard}: relative weight error {worst:.2e}"
        finally:
            autopar.destroy()
    assert out["losses-True-bf16"] == out["losses-False-bf16"], "bf16: re-gathering changed the numbers"
    return out


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_depth_block_regathered_in_backward(pool8, name):
    for out in pool8.run(depth_regather, name, timeout=600):
        for precision, width in (("fp32", 8), ("bf16", 2)):  # the fp32 runs are float64 models
            assert out[f"blocks-True-{precision}"] > 0
            # Keeping the gather saves one (y, x) block, of the matmul's dtype, per sharded matmul
            # call; re-gathering saves none of them.
            extra = out[f"saved-False-{precision}"] - out[f"saved-True-{precision}"]
            assert extra == out[f"blocks-False-{precision}"] * width, (precision, extra, out)
            # Each z all-gather moves half its block (z=2) in the dtype its consumer computes in:
            # a matmul's block twice (forward, and again in backward), an embedding's once, in
            # fp32 (autocast leaves lookups alone). Kept blocks are gathered once.
            matmul_bytes, lookup_bytes = (2, 4) if precision == "bf16" else (8, 8)
            for reshard, times in (("True", 2), ("False", 1)):
                expected = (times * out[f"blocks-{reshard}-{precision}"] * matmul_bytes
                            + out[f"lookups-{reshard}-{precision}"] * lookup_bytes) / 2
                assert out[f"gather-bytes-{reshard}-{precision}"] == expected, (reshard, precision, out)
