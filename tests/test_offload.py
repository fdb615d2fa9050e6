"""Offload modes, recompute and the memory report against the serial model.

On a CPU-only machine the "device" is the host, so the copies are host to host; the tests still
check that the state lives in the offload buffers (not merely on some CPU tensor) and that every
mode gives the serial numbers.
"""
import gc
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import autopar
from serial import train_serial
from autopar.offload import CpuStepper, StateOffloadStepper

MODES = (None, "optimizer", "optimizer+step")
LR = 1e-2


class Block(nn.Module):
    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, h):
        return h + self.drop(torch.nn.functional.gelu(self.fc(self.norm(h))))


class Net(nn.Module):
    """``mlp``: an up -> GELU -> down pair after the blocks, which ``auto_parallelize`` chains at
    the first forward (re-laying out weights that the offloaded steppers already copied)."""

    def __init__(self, dropout: float = 0.0, mlp: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(Block(16, dropout) for _ in range(3))
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) if mlp else None
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        if self.mlp is not None:
            h = h + self.mlp(h)
        return self.out(h)


def _mse(out, batch):
    return torch.nn.functional.mse_loss(out, batch[1])


def _batches(steps=3, n=16):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)) for _ in range(steps)]


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR)


def _serial(clip, mlp=False):
    torch.manual_seed(0)
    losses, state, _ = train_serial(Net(mlp=mlp), _batches(), _adamw, _mse, clip)
    return losses, state


def _assert_state_on_host(engine):
    stepper, opt = engine.stepper, engine.optimizer
    if engine.offload == "optimizer":
        homes = {buf.untyped_storage().data_ptr() for c in stepper._chunks for buf in c.host.values()}
        big = [t for s in opt.state.values() for t in s.values() if t.dim() > 0]
        assert len(big) == 2 * len(stepper.params)  # exp_avg, exp_avg_sq
        assert all(t.device.type == "cpu" and t.untyped_storage().data_ptr() in homes for t in big)
    if engine.offload == "optimizer+step":
        masters = opt.param_groups[0]["params"]
        assert len(masters) == len(stepper.params) and masters[0] is not stepper.params[0]
        assert all(m.device.type == "cpu" and m.dtype == torch.float32 for m in masters)
        assert all(t.device.type == "cpu" for s in opt.state.values() for t in s.values())
        assert opt.param_groups[0]["fused"] is True  # the fast path was selected


def check_modes_equal_serial(grid_kwargs, clip, tensor_parallel, zero):
    """Every mode on one grid; with ``tensor_parallel`` the layers are built sharded, so the
    steppers see shards, and with ``zero`` they see flat ZeRO shards of several tensors."""
    ref_losses, ref_state = _serial(clip, mlp=tensor_parallel)
    autopar.init(**grid_kwargs)
    results = {}
    for mode in MODES:
        torch.manual_seed(0)
        with autopar.auto_parallelize() if tensor_parallel else nullcontext():
            model = Net(mlp=tensor_parallel)
        engine = autopar.parallelize(model, optimizer=_adamw, loss_fn=_mse, clip_grad_norm=clip, offload=mode,
                                     zero=zero)
        if tensor_parallel:
            assert sum(p.numel() for p in engine.params) < sum(p.numel() for p in Net(mlp=True).parameters())
        losses = [engine.step(autopar.shard_batch(b)) for b in _batches()]
        if tensor_parallel and grid_kwargs.get("pp", 1) == 1:  # the first forward chained the MLP
            assert model.mlp[0].out_sharded and model.mlp[2].in_sharded
        _assert_state_on_host(engine)
        assert autopar.memory_report(engine).on_device["activations"] > 0
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, msg=f"offload={mode}")
        full = autopar.full_state_dict(engine)
        assert full.keys() == ref_state.keys()
        for k in full:
            torch.testing.assert_close(full[k], ref_state[k], rtol=1e-5, atol=1e-6, msg=f"offload={mode} {k}")
        results[mode] = (losses, full)
    base_losses, base = results[None]
    for mode in MODES[1:]:
        torch.testing.assert_close(results[mode][0], base_losses, rtol=1e-6, atol=1e-7)
        for k in base:
            torch.testing.assert_close(results[mode][1][k], base[k], rtol=1e-6, atol=1e-7, msg=f"{mode} {k}")
    return {mode: r[0] for mode, r in results.items()}


def test_offload_dp2_equals_serial(pool2):
    per_rank = pool2.run(check_modes_equal_serial, dict(dp=2), None, False, 0)
    assert all(r == per_rank[0] for r in per_rank)


@pytest.mark.parametrize("grid_kwargs, clip, tensor_parallel, zero", [
    (dict(dp=2, z=2), 0.05, False, 0),
    (dict(dp=2, x=2), None, True, 1),  # x-sharded layers, optimizer state ZeRO-1 sharded over dp
    (dict(pp=2, x=2), 0.05, True, 0),  # each stage steps its own x-shards; clipping spans stages
], ids=["dp2-z2-clip", "dp2-x2-zero1", "pp2-x2-clip"])
def test_offload_4_ranks_equals_serial(pool4, grid_kwargs, clip, tensor_parallel, zero):
    per_rank = pool4.run(check_modes_equal_serial, grid_kwargs, clip, tensor_parallel, zero)
    assert all(r == per_rank[0] for r in per_rank)


def _train(recompute, model_fn, batches, loss_fn, tensor_parallel=False):
    torch.manual_seed(0)
    with autopar.auto_parallelize() if tensor_parallel else nullcontext():
        model = model_fn()
    engine = autopar.parallelize(model, optimizer=_adamw, loss_fn=loss_fn, recompute=recompute)
    losses = [engine.step(autopar.shard_batch(b)) for b in batches]
    return engine, losses, autopar.full_state_dict(engine)


def _tiny_gpt2():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


def _lm_batches():
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(2)]
    return [{"input_ids": i, "labels": i} for i in ids]


def check_recompute_equals_plain():
    autopar.init(dp=2)
    cases = [(lambda: Net(dropout=0.2), _batches(), _mse, ["blocks.0", "blocks.1", "blocks.2"]),
             (_tiny_gpt2, _lm_batches(), None, ["transformer.h.0", "transformer.h.1"])]
    peaks = []
    for model_fn, batches, loss_fn, names in cases:
        plain, plain_losses, plain_state = _train(False, model_fn, batches, loss_fn)
        again, again_losses, again_state = _train(True, model_fn, batches, loss_fn)
        assert again.recomputed == names
        assert again_losses == plain_losses
        for k in plain_state:
            assert torch.equal(again_state[k], plain_state[k]), k
        peaks.append((autopar.memory_report(plain).on_device["activations"],
                      autopar.memory_report(again).on_device["activations"]))
    torch.manual_seed(0)
    by_policy = autopar.parallelize(Net(), optimizer=_adamw, loss_fn=_mse,
                                    recompute=lambda name, m: isinstance(m, (Block, nn.Linear)))
    assert by_policy.recomputed == ["inp", "blocks.0", "blocks.1", "blocks.2", "out"]  # not blocks.*.fc again
    return peaks


def test_recompute_equals_no_recompute(pool2):
    for peaks in pool2.run(check_recompute_equals_plain):
        for plain, recomputed in peaks:
            assert 0 < recomputed < plain


def check_recompute_tensor_parallel():
    """Recomputed blocks re-run their z all-gathers and x/y collectives inside backward; every
    rank does so in the same order, and the numbers are unchanged."""
    autopar.init(z=2, x=2)
    _, plain_losses, plain_state = _train(False, _tiny_gpt2, _lm_batches(), None, tensor_parallel=True)
    again, again_losses, again_state = _train(True, _tiny_gpt2, _lm_batches(), None, tensor_parallel=True)
    assert again.recomputed == ["transformer.h.0", "transformer.h.1"]
    torch.testing.assert_close(again_losses, plain_losses, rtol=0, atol=0)
    for k in plain_state:
        torch.testing.assert_close(again_state[k], plain_state[k], rtol=0, atol=0, msg=k)


def test_recompute_tensor_parallel(pool4):
    pool4.run(check_recompute_tensor_parallel)


def check_bad_options():
    autopar.init(dp=2)
    with pytest.raises(ValueError, match="unknown offload 'gpu'"):
        autopar.parallelize(Net(), optimizer=_adamw, loss_fn=_mse, offload="gpu")
    with pytest.raises(ValueError, match="unknown recompute 'yes'"):
        autopar.parallelize(Net(), optimizer=_adamw, loss_fn=_mse, recompute="yes")
    with pytest.raises(ValueError, match="found no repeated blocks"):
        autopar.parallelize(nn.Linear(8, 4), optimizer=_adamw, loss_fn=_mse, recompute=True)
    with pytest.raises(NotImplementedError, match="offload='params'"):
        autopar.parallelize(Net(), optimizer=_adamw, loss_fn=_mse, offload="params")


def test_unknown_options_error(pool2):
    pool2.run(check_bad_options)


def check_memory_report():
    autopar.init(dp=2)
    reports = {}
    for mode in MODES:
        torch.manual_seed(0)
        engine = autopar.parallelize(Net(), optimizer=_adamw, loss_fn=_mse, offload=mode)
        engine.step(autopar.shard_batch(_batches(1)[0]))
        reports[mode] = autopar.memory_report(engine, all_ranks=True)
    return reports, sum(p.numel() for p in Net().parameters()), len(list(Net().parameters()))


def test_memory_report_matches_analytic(pool2):
    reports, numel, tensors = pool2.run(check_memory_report)[0]
    fp32, adam = 4 * numel, 8 * numel          # weights; exp_avg + exp_avg_sq
    step = 4 * tensors                          # AdamW's 0-d fp32 "step" per parameter
    for mode, per_rank in reports.items():
        assert [r.rank for r in per_rank] == [0, 1]
        dev, host = per_rank[0].on_device, per_rank[0].on_host
        assert dev["parameters"] == fp32 and dev["gradients"] == fp32 and dev["activations"] > 0
        expect_dev_state, expect_host = {None: (adam + step, (0, 0, 0)),
                                         "optimizer": (step, (0, 0, adam)),
                                         "optimizer+step": (0, (fp32, fp32, adam + step))}[mode]
        assert dev["optimizer_state"] == expect_dev_state, mode
        assert (host["parameters"], host["gradients"], host["optimizer_state"]) == expect_host, mode
    assert "optimizer+step" in autopar.offload.format_reports(reports["optimizer+step"])


def _random_grads(params, seed, skip=()):
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=g)


def test_chunked_state_offload_is_exact():
    """Many small chunks, a parameter whose state appears only at step 2, and a state dict round
    trip: bit-identical to the plain optimizer (CPU AdamW steps each parameter on its own)."""
    cpu = SimpleNamespace(device=torch.device("cpu"))
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(n)) for n in (30, 7, 50, 3, 64)]
    mine = [nn.Parameter(p.detach().clone()) for p in ref]
    factory = lambda ps: torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.3}], lr=LR)
    plain = factory(ref)
    stepper = StateOffloadStepper(factory, mine, cpu, chunk_numel=40)
    assert len(stepper._chunks) == 4
    for step in range(4):
        skip = (3,) if step == 0 else ()
        _random_grads(ref, step, skip)
        _random_grads(mine, step, skip)
        plain.step()
        stepper.step()
        assert all(p.grad is None for p in mine)
        for a, b in zip(ref, mine):
            assert torch.equal(a, b)
        if step == 1:  # checkpoint round trip: loaded state is sent back to the host buffers
            stepper.optimizer.load_state_dict(stepper.optimizer.state_dict())
    assert [g["params"] for g in stepper.optimizer.param_groups] == [mine[:2], mine[2:]]
    assert stepper.memory()["host"]["optimizer_state"] == 8 * sum(p.numel() for p in mine)


def test_cpu_step_respects_explicit_choice_and_bf16_device_params():
    """An explicit foreach=False is kept; bf16 device weights follow fp32 master weights."""
    cpu = SimpleNamespace(device=torch.device("cpu"))
    torch.manual_seed(0)
    master_ref = [nn.Parameter(torch.randn(5, 3))]
    device_params = [nn.Parameter(master_ref[0].detach().to(torch.bfloat16))]
    stepper = CpuStepper(lambda ps: torch.optim.AdamW(ps, lr=LR, foreach=False), device_params, cpu)
    assert stepper.optimizer.param_groups[0]["fused"] is None
    stepper.masters[0].data.copy_(master_ref[0])  # bf16 rounding of the start is not under test
    plain = torch.optim.AdamW(master_ref, lr=LR, foreach=False)
    for step in range(3):
        _random_grads(master_ref, step)
        device_params[0].grad = master_ref[0].grad.to(torch.bfloat16)
        master_ref[0].grad = device_params[0].grad.float()
        plain.step()
        stepper.step()
    assert torch.equal(stepper.masters[0], master_ref[0])
    assert torch.equal(device_params[0], master_ref[0].detach().to(torch.bfloat16))


def test_cpu_step_grads_handed_over_early():
    """Gradients handed over per bucket (``grads_ready``) before ``step`` give the same update,
    and the fast path is the fused AdamW: equal to torch's fused AdamW on the same numbers."""
    cpu = SimpleNamespace(device=torch.device("cpu"))
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(n)) for n in (10, 20, 30)]
    mine = [nn.Parameter(p.detach().clone()) for p in ref]
    plain = torch.optim.AdamW(ref, lr=LR, fused=True)
    stepper = CpuStepper(_adamw, mine, cpu)
    for step in range(3):
        _random_grads(ref, step)
        _random_grads(mine, step)
        stepper.grads_ready(mine[1:])
        mine[2].grad = None  # the hand-over copied the gradient: the device copy may go
        ref[2].grad = ref[2].grad.clone()
        plain.step()
        stepper.step()
        assert all(torch.equal(a, b) for a, b in zip(ref, mine))


def _grads_the_optimizer_sees(offload):
    """dp=2 with clipping and small buckets: per step, the gradients the user's optimizer is
    stepped with (the host masters' under ``optimizer+step``) and, per step, the number of
    parameters each early hand-over (``grads_ready``) carried before ``step`` began."""
    torch.manual_seed(0)
    fused = lambda p: torch.optim.AdamW(p, lr=LR, fused=True)  # noqa: E731 (the host step's own choice)
    engine = autopar.parallelize(Net(), optimizer=fused, loss_fn=_mse, clip_grad_norm=0.05, offload=offload,
                                 bucket_mb=0.0005)
    seen, handed, stepping = [], [], [False]
    stepper, real_step, real_ready = engine.stepper, engine.stepper.step, engine.stepper.grads_ready

    def ready(params):
        assert not stepping[0], "a hand-over after the step began"
        handed[-1].append(len(params))
        real_ready(params)

    def step(grad_scale=None):
        stepping[0] = True
        real_step(grad_scale=grad_scale)
        stepping[0] = False

    def opt_step(*args, _real=engine.optimizer.step):
        seen.append([p.grad.clone() for group in engine.optimizer.param_groups for p in group["params"]])
        return _real(*args)

    stepper.grads_ready, stepper.step, engine.optimizer.step = ready, step, opt_step
    for b in _batches(steps=4):
        handed.append([])
        engine.step(autopar.shard_batch(b))
    return seen, handed, len(engine.dp.buckets), len(engine.dp.reduced)


def check_host_step_takes_grads_per_bucket():
    autopar.init(dp=2)
    device, device_handed, _, _ = _grads_the_optimizer_sees(None)
    host, handed, buckets, reduced = _grads_the_optimizer_sees("optimizer+step")
    assert device_handed == [[]] * 4  # a device step is never handed anything early
    assert buckets > 2
    # First step: the bucket layout and the unused parameters are still being learnt.
    assert handed[0] == [] and all(len(h) == buckets and sum(h) == reduced for h in handed[1:]), handed
    # Clipping reaches the early host copies: the same numbers as clipping on the device.
    for step, (d, h) in enumerate(zip(device, host)):
        assert all(torch.equal(a, b) for a, b in zip(d, h)), f"step {step}"


def test_host_step_takes_grads_per_bucket_and_clips_them(pool2):
    pool2.run(check_host_step_takes_grads_per_bucket)


def test_a_graph_saved_under_the_meter_does_not_hold_the_model():
    """Autograd keeps saved-tensor hooks, and what they pack, in C++ for as long as the graph
    that saved them lives, out of the GC's sight. A zero-bubble stage's input-gradient pass
    (``retain_graph=True``) once left such a graph alive past ``destroy()``: the meter's bound
    pack hook held the model, the model the pipeline, the pipeline its process groups (threads
    that polled for the rest of the process). The meter must be reachable from a graph only
    weakly, and still count while it lives."""
    import sys
    import weakref

    from autopar.offload.memory import ActivationMeter

    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    meter = ActivationMeter(model)
    x = torch.randn(32, 8, requires_grad=True)
    with meter:
        loss = model(x).log_softmax(-1).sum()
    torch.autograd.grad(loss, [x], retain_graph=True)
    assert meter.peak >= 32 * 16 * 4  # the tanh output, at least, was counted
    # ``loss`` keeps the graph alive past its step, as the retained zero-bubble graph did
    gone = weakref.ref(model), weakref.ref(meter)
    del model, meter
    gc.collect()
    assert all(ref() is None for ref in gone), "a live autograd graph keeps the meter and its model"
    raised, hook = [], sys.unraisablehook
    sys.unraisablehook = raised.append  # an error in _Saved.__del__ would only be printed
    try:
        del loss  # the graph dies, and its saved records are released after their meter
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not raised, [str(r.exc_value) for r in raised]


def test_an_output_saved_at_an_old_parameter_address_does_not_leak_its_graph():
    """The meter leaves parameters' storage uncounted by address, and a parameter that moved
    (into a gradient bucket's flat buffer) frees its old address for the next activation. An op
    that saves its own output (tanh here, attention in the model where it was seen) then had
    that output packed as itself: output -> grad_fn -> saved output, a cycle in C++ that the GC
    cannot break. With ``retain_graph=True`` (zero bubble's input-gradient pass) the graph, and
    the tensor-parallel Functions' grids in it, outlived ``destroy()`` on 1 or 2 of 4 ranks."""
    import weakref

    from autopar.offload.memory import ActivationMeter

    model = nn.Linear(8, 16)
    meter = ActivationMeter(model)
    x = torch.randn(4, 8, requires_grad=True)
    with meter:
        h = model(x)
        out = torch.empty_like(h)
        meter._params.add(out.untyped_storage().data_ptr())  # as if a moved parameter had lived there
        out.copy_(h).tanh_()  # tanh saves its output: ``out`` itself
        loss = out.sum()
    torch.autograd.grad(loss, [x], retain_graph=True)
    gone = weakref.ref(out)
    del loss, out, h
    gc.collect()
    assert gone() is None, "the graph stayed alive: a saved output held its own grad_fn"
