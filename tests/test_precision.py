"""Mixed precision (``parallelize(precision=...)``) against serial training, on 4 gloo ranks.

Every run takes 3 AdamW steps (fp16 runs clip at 0.5, active on every step) on the global batch and
is compared, on every rank, with two serial references run on the same global batches:

* fp32 serial: the documented accuracy of bf16 / fp16 training (README);
* serial under the same autocast (fp16: with torch's own ``GradScaler``), its gradient
  accumulated over the same batch slices the grid sums (dp * z * microbatches; in fp32 that is
  one backward of the whole batch to summation order). Autocast rounds each slice's weight
  gradient to bf16/fp16 before the fp32 sum, so only this reference can be matched tightly.

Metrics: max |loss difference| over the steps, max |weight difference|, and the relative error of
the whole update, ||W - W_ref|| / ||W_ref - W_0|| (2-norms over all weights). AdamW's first
steps are about lr * sign(grad), so rounding noise on near-zero gradients moves single weights
by up to ~lr = 1e-2: the max weight difference is lr-sized whatever the precision; the relative
update error is the informative number.

Measured (torch 2.13 CPU, gloo), as (max |dloss|, max |dw|, relative update error):

=====================  ==========================  ===========================
run                    vs fp32 serial              vs same-autocast serial
=====================  ==========================  ===========================
pp2 x dp2 GPT-2 bf16   9.1e-5, 2.3e-2, 3.1e-2      2.4e-7, 1.2e-7, 8.3e-8
pp2 x dp2 GPT-2 fp16   1.6e-5, 4.1e-3, 4.7e-3      1.2e-6, 2.2e-5, 4.4e-5
dp2 x x2 Llama bf16    3.0e-4, 1.6e-2, 4.5e-2      2.7e-4, 1.5e-2, 3.7e-2
dp2 x x2 Llama fp16    2.3e-4, 1.5e-2, 3.0e-2      2.5e-4, 1.6e-2, 2.2e-2
=====================  ==========================  ===========================

(fp32 on the same grids: <= 2.4e-7, 2.3e-6, 3.7e-6.) With pipeline and data parallelism the
forward is per sample the serial one, so a bf16/fp16 step equals the same-autocast serial step to
fp32 summation order (in fp16, whose grid is fine enough that such last-bit differences flip a
few weights' rounding in the next forward, to a few fp16 ulps: ``VS_SAME_FP16_ORDER``). Tensor parallelism cannot: each x rank's partial matmul is rounded to
bf16/fp16 and summed in that dtype (as Megatron's row-parallel layers do), one rounding more than
the serial matmul, so a TP grid is as far from same-autocast serial as that is from fp32 (the
serial bf16 run itself is 1.4e-4 / 4.8e-2 in loss / relative update from fp32 serial on Llama).
Tolerances below are the measurements with ~2-3x headroom.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import autopar
import intra_layer_models
import pipeline_models

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STEPS = 3
CLIP = 0.5

# kind -> grid, microbatches, number of batch slices summed per step (dp * z * microbatches)
GRIDS = {"tp": (dict(dp=2, x=2), 1, 2), "pp": (dict(pp=2, dp=2), 2, 4), "skip": (dict(pp=2, dp=2), 2, 4)}

# (max |dloss|, max |dw|, relative update error) allowed against fp32 serial, all precisions
VS_FP32 = (1e-3, 5e-2, 1e-1)
# ... against same-autocast serial: summation order only with pp/dp; TP adds a rounding per matmul
VS_SAME_TIGHT = (2e-6, 1e-5, 1e-5)
VS_SAME_TP = (1e-3, 5e-2, 1e-1)
# pp/dp in fp16: gradients summed in another order (stage-local microbatches, then dp, then the
# tied GPT-2 embedding across stages) differ from serial in the last fp32 bit; fp16's finer grid
# (2**-11) then rounds a few weights of the next forward one fp16 ulp apart, with or without
# clipping (measured 9.4e-6 / 1.2e-5 unclipped, 2.2e-5 / 4.4e-5 and 3.5e-5 / 3.9e-5 clipped in
# max |dw| / relative update). bf16's coarser grid (2**-8) flips none here. Still 20x below the
# fp16-vs-fp32 effect (4e-3), so a lost microbatch or a wrong scale would show.
VS_SAME_FP16_ORDER = (2e-6, 2e-4, 2e-4)
# LongSkip's fp32 run differs from serial in the last bits; bf16 rounding of the next forward turns
# that into a few bf16 ulps of its weights (measured 6e-8, 1.7e-4, 3.0e-4)
VS_SAME_SKIP = (2e-6, 1e-3, 1e-3)
# below this relative update error a low-precision run has not really run in low precision
AUTOCAST_VISIBLE = 1e-3


def _adamw(params):
    # eps=1e-5: attention key biases have an identically zero gradient (rounding noise only),
    # which a tiny eps would blow up into lr-sized steps of arbitrary sign.
    return torch.optim.AdamW(params, lr=1e-2, eps=1e-5, weight_decay=0.01)


def _loss(output, batch):
    return output["loss"]  # HF ModelOutput and LongSkip's dict alike


def _build(kind: str, parallel: bool) -> nn.Module:
    if kind == "tp":
        torch.manual_seed(1)
        if not parallel:
            return intra_layer_models.llama()
        with autopar.auto_parallelize():
            return intra_layer_models.llama()
    return pipeline_models.build("gpt2" if kind == "pp" else "skip", 4)


def _batches(kind: str) -> list[dict]:
    if kind == "tp":
        out = []
        for s in range(STEPS):
            ids = torch.randint(0, intra_layer_models.V, (8, 6), generator=torch.Generator().manual_seed(s))
            out.append({"input_ids": ids, "labels": ids.clone()})
        return out
    return [pipeline_models.batch("gpt2" if kind == "pp" else "skip", 8, seed=s + 1) for s in range(STEPS)]


def _inf_like(grad: torch.Tensor) -> torch.Tensor:
    return torch.full_like(grad, float("inf"))


def _serial(kind: str, precision: str, clip: float | None, init_scale: float = 2.0 ** 16,
            inject: dict | None = None, rescale: dict | None = None):
    """Serial reference (see the module docstring); fp16 uses torch's GradScaler. ``inject``:
    {step: param name} whose gradient is made inf in that step; ``rescale``: {step: scale}
    set after that step. Returns (losses, state_dict, skipped steps)."""
    model = _build(kind, parallel=False)
    opt = _adamw(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if precision == "fp16" else None
    dtype = DTYPES[precision]
    params = dict(model.named_parameters())
    n = GRIDS[kind][2]
    losses, skipped = [], 0
    for step, batch in enumerate(_batches(kind)):
        handle = params[inject[step]].register_hook(_inf_like) if inject and step in inject else None
        total = 0.0
        for i in range(n):
            part = {k: v.chunk(n)[i] for k, v in batch.items()}
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = _loss(model(**part), part) / n
            (scaler.scale(loss) if scaler else loss).backward()
            total += loss.item()
        if scaler is not None:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is None:
            opt.step()
        else:
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update(rescale.get(step) if rescale else None)
            skipped += scaler.get_scale() < before
        opt.zero_grad()
        if handle is not None:
            handle.remove()
        losses.append(total)
    return losses, model.state_dict(), skipped


def _diff(kind: str, losses, state, ref_losses, ref_state) -> tuple[float, float, float]:
    """(max |dloss|, max |dw|, ||W - W_ref|| / ||W_ref - W_0||)."""
    dl = max(abs(a - b) for a, b in zip(losses, ref_losses))
    assert list(state) == list(ref_state), "names differ from the serial model's"
    dw = max((state[k].float() - ref_state[k].float()).abs().max().item() for k in ref_state)
    init = _build(kind, parallel=False).state_dict()
    num = sum((state[k].float() - ref_state[k].float()).square().sum() for k in ref_state).sqrt()
    den = sum((ref_state[k].float() - init[k].float()).square().sum() for k in ref_state).sqrt()
    return dl, dw, (num / den).item()


def _within(what: str, measured: tuple[float, ...], bound: tuple[float, ...]) -> None:
    assert all(m <= b for m, b in zip(measured, bound)), f"{what}: measured {measured}, allowed {bound}"


def _clip(precision: str, kind: str) -> float | None:
    """fp16 runs clip, to show clipping sees unscaled gradients. bf16 runs do not: clipping's
    norm differs from serial in the last fp32 bit (summation order), and the next forward's
    rounding to bf16 turns a few such weights into whole bf16 ulps (measured 8e-4 relative
    update error vs same-autocast serial instead of 1e-7), which would hide a real bug."""
    return CLIP if precision == "fp16" else None


def _engine(kind: str, precision: str):
    grid, microbatches, _ = GRIDS[kind]
    autopar.init(**grid)
    return autopar.parallelize(_build(kind, parallel=True), optimizer=_adamw, precision=precision,
                               num_microbatches=microbatches, loss_fn=_loss,
                               clip_grad_norm=_clip(precision, kind))


def _record_sends(engine) -> list[tuple[int, int, list[torch.dtype]]]:
    """Wrap the pipeline's grouped launches to record the dtypes of what they send."""
    sent: list[tuple[int, int, list[torch.dtype]]] = []
    p2p = engine.pipeline.p2p
    post = p2p.post

    def recording(step, outbox, metas):
        for msg in step.sends:
            sent.append((msg.kind, msg.chunk, [t.dtype for t in outbox[msg]]))
        return post(step, outbox, metas)
    p2p.post = recording
    return sent


def check_precision_equals_serial(kind: str, precision: str) -> tuple[list[float], tuple, tuple]:
    engine = _engine(kind, precision)
    batches = _batches(kind)
    losses = [engine.step(autopar.shard_batch(batches[0]))]
    sent = _record_sends(engine) if engine.pipeline is not None else []
    losses += [engine.step(autopar.shard_batch(b)) for b in batches[1:]]
    state = autopar.full_state_dict(engine)
    if engine.pipeline is not None:  # what crosses stages has the dtypes traced under autocast
        metas = engine.pipeline.metas
        for direction, chunk, dtypes in sent:
            traced = [dt for _, dt in metas[chunk]]
            if direction == 1:  # gradients: of the floating-point inputs only
                traced = [traced[i] for i in engine.pipeline.floating[chunk]]
            assert dtypes == traced, (direction, chunk, dtypes, traced)
        assert sent, "stage 0 and 1 both send"
    if precision == "fp16":
        assert engine.loss_scaler.skipped_steps == 0 and engine.loss_scaler.scale.item() == 2.0 ** 16
    else:
        assert engine.loss_scaler is None
    autopar.destroy()
    fp32 = _diff(kind, losses, state, *_serial(kind, "fp32", _clip(precision, kind))[:2])
    same = _diff(kind, losses, state, *_serial(kind, precision, _clip(precision, kind))[:2])
    case = f"{kind} {precision}"
    if precision == "fp32":
        _within(f"{case} vs fp32 serial", fp32, (1e-5, 1e-5, 1e-5))
    else:
        _within(f"{case} vs fp32 serial", fp32, VS_FP32)
        assert fp32[2] > AUTOCAST_VISIBLE, f"{case} is as exact as fp32: did autocast run? {fp32}"
        tight = VS_SAME_FP16_ORDER if precision == "fp16" else VS_SAME_TIGHT
        _within(f"{case} vs same-autocast serial", same, {"tp": VS_SAME_TP, "skip": VS_SAME_SKIP}.get(kind, tight))
    return losses, fp32, same


@pytest.mark.parametrize("kind", ["tp", "pp"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_equals_serial(pool4, kind, precision):
    per_rank = pool4.run(check_precision_equals_serial, kind, precision)
    assert all(r[0] == per_rank[0][0] for r in per_rank), "losses must be identical on every rank"
    print(f"\n{kind} {precision}: vs fp32 {per_rank[0][1]}, vs same autocast {per_rank[0][2]}")


def check_bf16_activations_cross_stages() -> list:
    """LongSkip sends several tensors per boundary (a long skip among them), all of them outputs
    of Linear units: under autocast they are bf16, so the traced p2p buffers must be bf16 too
    (half the bytes of fp32), and the run equal to bf16 serial."""
    check_precision_equals_serial("skip", "bf16")
    engine = _engine("skip", "bf16")
    engine.step(autopar.shard_batch(_batches("skip")[0]))
    return [dt for metas in engine.pipeline.metas for _, dt in metas]


def test_pp2_bf16_activations_cross_as_bf16(pool4):
    dtypes = pool4.run(check_bf16_activations_cross_stages)[0]
    assert len(dtypes) > 2 and set(dtypes) == {torch.bfloat16}, dtypes


def _optimizer_steps(engine) -> list[float]:
    return [s["step"].item() for s in engine.optimizer.state.values()]


def _assert_unchanged(before: dict, engine, steps: list[float], what: str) -> None:
    """Full weights (layout-independent, so a re-sharding would not count) bit-identical, and no
    optimizer state advanced on this rank."""
    after = autopar.full_state_dict(engine)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{what}: a skipped step changed {changed[:3]}"
    assert _optimizer_steps(engine) == steps, f"{what}: the optimizer stepped"


def check_huge_scale_skips_first_step() -> None:
    """dp=2 x x=2: a 2**40 scale overflows in step 1 on every rank; the step is skipped, the scale
    halves, then (scale set to 2**12 here and in serial) the next steps equal serial fp16 with
    GradScaler, which skipped the same step."""
    engine = _engine("tp", "fp16")
    engine.loss_scaler.scale.fill_(2.0 ** 40)
    batches = _batches("tp")
    before = autopar.full_state_dict(engine)
    losses = [engine.step(autopar.shard_batch(batches[0]))]
    _assert_unchanged(before, engine, [], "huge scale")  # AdamW has no state before its first step
    assert engine.loss_scaler.skipped_steps == 1 and engine.loss_scaler.scale.item() == 2.0 ** 39
    engine.loss_scaler.scale.fill_(2.0 ** 12)
    losses += [engine.step(autopar.shard_batch(b)) for b in batches[1:]]
    assert engine.loss_scaler.skipped_steps == 1 and engine.loss_scaler.scale.item() == 2.0 ** 12
    state = autopar.full_state_dict(engine)
    autopar.destroy()
    ref_losses, ref_state, skipped = _serial("tp", "fp16", CLIP, init_scale=2.0 ** 40, rescale={0: 2.0 ** 12})
    assert skipped == 1
    _within("huge scale vs serial GradScaler", _diff("tp", losses, state, ref_losses, ref_state), VS_SAME_TP)


def test_fp16_huge_scale_skips_step_on_every_rank(pool4):
    pool4.run(check_huge_scale_skips_first_step)


INJECTED = "transformer.ln_f.weight"  # on the last stage, not tied to a weight of stage 0


def check_overflow_on_one_rank_skips_everywhere() -> None:
    """pp=2 x dp=2: in step 2 only the rank at pp=1, dp=0 produces an inf gradient (its dp peer
    gets it from the reduction; stage 0 never sees it). All four ranks must skip together."""
    engine = _engine("pp", "fp16")
    batches = _batches("pp")
    losses = [engine.step(autopar.shard_batch(batches[0]))]
    grid = autopar.current_grid()
    handle = None
    if grid.coords["pp"] == 1 and grid.coords["dp"] == 0:
        handle = dict(engine.model.named_parameters())[INJECTED].register_hook(_inf_like)
    before, steps = autopar.full_state_dict(engine), _optimizer_steps(engine)
    losses.append(engine.step(autopar.shard_batch(batches[1])))
    _assert_unchanged(before, engine, steps, "overflow on one rank")
    assert engine.loss_scaler.skipped_steps == 1 and engine.loss_scaler.scale.item() == 2.0 ** 15
    if handle is not None:
        handle.remove()
    losses.append(engine.step(autopar.shard_batch(batches[2])))
    assert engine.loss_scaler.skipped_steps == 1
    state = autopar.full_state_dict(engine)
    autopar.destroy()
    ref_losses, ref_state, skipped = _serial("pp", "fp16", CLIP, inject={1: INJECTED})
    assert skipped == 1
    _within("one-rank overflow vs serial GradScaler", _diff("pp", losses, state, ref_losses, ref_state),
            VS_SAME_FP16_ORDER)


def test_fp16_overflow_on_one_rank_skips_on_all(pool4):
    pool4.run(check_overflow_on_one_rank_skips_everywhere)


def bad_precision() -> list[str]:
    autopar.init(dp=4)
    messages = []
    for bad in ("fp8", "bfloat16", None, torch.bfloat16):
        with pytest.raises(ValueError, match="unknown precision") as info:
            autopar.parallelize(nn.Linear(2, 2), optimizer=_adamw, precision=bad)
        messages.append(str(info.value))
    return messages


def test_bad_precision_raises(pool4):
    messages = pool4.run(bad_precision)[0]
    assert "'fp8'" in messages[0] and "('fp32', 'bf16', 'fp16')" in messages[0], messages[0]


def autocast_output_dtypes() -> list[tuple[str, torch.dtype, torch.dtype, float]]:
    """x2 x y2, full-feature layout: each biased layer kind under bf16 autocast, serial and
    parallel from one seed on one input: (layer, serial dtype, parallel dtype, max |difference|)."""
    from transformers.pytorch_utils import Conv1D

    autopar.init(x=2, y=2)
    makers = {"Linear": lambda: nn.Linear(8, 12), "Conv1D": lambda: Conv1D(12, 8)}
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    out = []
    for name, make in makers.items():
        torch.manual_seed(0)
        serial = make()
        torch.manual_seed(0)
        with autopar.auto_parallelize(chain=False):
            par = make()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = serial(x), par(x)
        out.append((name, a.dtype, b.dtype, float((a.float() - b.float()).abs().max())))
    return out


def test_autocast_keeps_the_serial_output_dtype(pool4):
    """F.linear under autocast casts the bias too: a parallel layer's output is bf16 like the
    serial one's (an fp32 bias add made it fp32, so the next gather moved twice the bytes)."""
    for name, serial, parallel, diff in pool4.run(autocast_output_dtypes)[0]:
        assert serial == parallel == torch.bfloat16, (name, serial, parallel)
        assert diff < 2e-2, (name, diff)  # a bf16 ulp or two at these magnitudes
