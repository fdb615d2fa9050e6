"""One script for a lent GPU: every GPU claim of autopar that one device can check, in one table.

Why one script: a GPU machine is lent rarely and briefly (minutes), so everything a single
device can prove is prepared here, runs in under 5 minutes on an H200, and prints one markdown
table (``bench/tables.py``) to paste into ``bench/REPORT.md``. ``--dry-run`` runs the very same
code paths on the CPU at tiny size (gloo, 1 warm-up + 2 timed steps) so CI proves the script
works before any GPU time is spent on it (``tests/test_gpu_check.py``).

    python bench/gpu_check.py            # on the GPU machine
    python bench/gpu_check.py --dry-run  # anywhere, ~1 minute on 2 cores

Rows (each guarded: a failure becomes a FAIL row with its reason, the others still run, and the
exit code is 1 if any row failed):

a. 1x1x1 bf16 step of a ~125M GPT-2 (``transformers.GPT2Config()`` sizes, nothing downloaded),
   built under ``auto_parallelize`` and trained by ``parallelize(precision="bf16")``, against
   plain PyTorch: the same model, seed, AdamW and batch, forward under ``torch.autocast(bf16)``.
   Steps are interleaved so that load hits both alike; median step time, ratio autopar / plain.
   MFU = 6 * N * tokens / step_time / peak, with N the parameters (tied embedding once),
   tokens = batch * seq per step, attention FLOPs left out, peak = ``--peak-tflops`` (H200 dense
   bf16: 989e12 FLOP/s).
b. the same with ``torch.compile`` (``nn.Module.compile``, inductor; the dry run uses the
   ``aot_eager`` backend: dynamo's tracing and AOTAutograd, where autopar's hooks could break,
   without code generation), plain PyTorch compiled as the peer. A compile failure is a FAIL
   row, not a crash.
c. peak memory of a steady-state autopar step, ``torch.cuda.max_memory_allocated`` over what was
   allocated before the engine, against ``autopar.memory_report``'s device total (parameters,
   gradients, optimizer state, activations saved for backward). Reported, not bounded: the
   allocator also sees autocast's bf16 weight copies, logits and workspaces. Without CUDA the
   measured side counts the tensors held (parameter, gradient and AdamW state storages) plus the
   peak of autopar's own saved-tensor counter (``offload.ActivationMeter``) over the step.
d. ``offload="optimizer"`` and ``offload="optimizer+step"`` steps against the device AdamW step
   of the same engine, whole ``Engine.step`` time ratio.
e. two processes on the one device (both ``cuda:0``, gloo with CUDA tensors) running dp=2, x=2
   and pp=2 in turn, each checked against serial training by ``autopar check``'s own comparison
   (float64, 3 AdamW steps, error of each tensor relative to its own update, bound 1e-9 on the
   CPU; 1e-5 on a GPU, where ``autopar check``'s serial reference stays on the CPU and HF's loss
   runs on fp32 logits, so CPU and CUDA kernels round that loss differently, ~1e-7);
   then the NCCL world of one: ``autopar.init(backend="nccl")``, an ``Engine.step``, and
   ``autopar check``'s verdict (its all-reduce on the grid's device) under NCCL. The dry run
   uses gloo on the CPU for both.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import queue
import re
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import autopar
from autopar.cli import check as autopar_check
from autopar.cli.options import add_check_arguments
from autopar.offload.stepper import state_tensors

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tables import table  # noqa: E402 - bench/ holds scripts, not a package

HEADER = ["section", "check", "autopar", "peer", "ratio / error", "status"]
Row = list[str]
Batch = dict[str, torch.Tensor]
StepFn = Callable[[Batch], float]
PAIR_GRIDS = {"dp=2": dict(dp=2), "x=2": dict(x=2), "pp=2": dict(pp=2)}
PAIR_TIMEOUT_S = 240.0  # all three grids; a collective gives up after PAIR_COLLECTIVE_S
PAIR_COLLECTIVE_S = 60.0


@dataclass(frozen=True)
class Size:
    """Model, batch and step counts of one run."""

    layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    batch: int
    warmup: int
    steps: int
    compile_backend: str


FULL = Size(layers=12, hidden=768, heads=12, vocab=50257, seq=1024, batch=16, warmup=3, steps=10,
            compile_backend="inductor")
DRY = Size(layers=1, hidden=64, heads=4, vocab=256, seq=32, batch=4, warmup=1, steps=2, compile_backend="aot_eager")


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:160].replace("|", "/")


def guarded(section: str, names: list[str], fn: Callable[[], list[Row]]) -> list[Row]:
    """``fn``'s rows, or one FAIL row per expected name with the exception (traceback to stderr)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row
        traceback.print_exc(file=sys.stderr)
        return [[section, name, "-", "-", "-", f"FAIL: {_reason(exc)}"] for name in names]


def _gpt2(size: Size) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=size.vocab, n_positions=size.seq, n_embd=size.hidden,
                                  n_layer=size.layers, n_head=size.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"  # else HF logs a warning from forward: a graph break under compile
    return model


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4)


def _batches(size: Size, device: torch.device) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(size.warmup + size.steps):
        ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()  # parallelised models hold reference cycles (modules <-> hooks)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_steps(runs: dict[str, StepFn], size: Size, device: torch.device
               ) -> tuple[dict[str, float], dict[str, list[float]], dict[str, str]]:
    """Median seconds per step after ``size.warmup`` steps, the losses, and the error of each run
    that raised (it is dropped; the others go on). Runs are interleaved step by step."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    errors: dict[str, str] = {}
    for i, batch in enumerate(_batches(size, device)):
        for name, step in runs.items():
            if name in errors:
                continue
            _sync(device)
            start = time.perf_counter()
            try:
                losses[name].append(step(batch))  # every step ends in a host sync (its loss)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                traceback.print_exc(file=sys.stderr)
                errors[name] = _reason(exc)
                continue
            _sync(device)
            if i >= size.warmup:
                times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items() if t and n not in errors}, losses, errors


def plain_step(size: Size, device: torch.device, compile_backend: str | None = None) -> StepFn:
    """Plain PyTorch: autocast bf16 forward (HF's loss inside it), backward, AdamW step."""
    model = _gpt2(size).to(device)
    if compile_backend:
        model.compile(backend=compile_backend)
    opt = _adamw(model.parameters())

    def step(batch: Batch) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def autopar_engine(size: Size, compile_backend: str | None = None, offload: str | None = None) -> autopar.Engine:
    with autopar.auto_parallelize():
        model = _gpt2(size)
    engine = autopar.parallelize(model, optimizer=_adamw, precision="bf16", offload=offload)
    if compile_backend:
        engine.model.compile(backend=compile_backend)
    return engine


def _ms(seconds: float, mfu: float | None) -> str:
    return f"{seconds * 1e3:.1f} ms" + (f", MFU {mfu:.1%}" if mfu is not None else "")


def speed_row(section: str, name: str, size: Size, device: torch.device, params: int, peak_flops: float | None,
              compile_backend: str | None) -> list[Row]:
    """Rows a and b: autopar against plain PyTorch, eager or compiled."""
    runs = {"plain": plain_step(size, device, compile_backend),
            "autopar": autopar_engine(size, compile_backend).step}
    medians, losses, errors = time_steps(runs, size, device)
    tokens = size.batch * size.seq

    def cell(run: str) -> str:
        if run in errors:
            return f"failed: {errors[run]}"
        mfu = 6 * params * tokens / medians[run] / peak_flops if peak_flops else None
        return _ms(medians[run], mfu)
    if errors:
        failed = ", ".join(f"{run}: {msg}" for run, msg in errors.items())
        return [[section, name, cell("autopar"), cell("plain"), "-", f"FAIL: {failed}"]]
    dloss = max(abs(a - b) for a, b in zip(losses["autopar"], losses["plain"]))
    return [[section, name, cell("autopar"), cell("plain"), f"{medians['autopar'] / medians['plain']:.3f}",
             f"ok (max abs loss diff {dloss:.1e})"]]


def _held_bytes(engine: autopar.Engine, grads: dict[int, int]) -> int:
    """Bytes of the distinct storages behind the parameters and optimizer state, plus ``grads``
    (storage -> bytes of the gradients seen during the step: the step frees them again)."""
    tensors = list(engine.params) + state_tensors(engine.optimizer)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) + sum(grads.values())


def memory_row(size: Size, device: torch.device) -> list[Row]:
    """Row c: measured peak of the second (steady-state) step against ``memory_report``."""
    _free(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    engine = autopar_engine(size)
    first, second = _batches(size, device)[:2]
    engine.step(first)  # creates the optimizer state and settles the layout
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine.activation_meter.enabled, engine.activation_meter.peak = True, 0
    grads: dict[int, int] = {}

    def seen(p: torch.Tensor) -> None:
        grads[p.grad.untyped_storage().data_ptr()] = p.grad.untyped_storage().nbytes()
    hooks = [p.register_post_accumulate_grad_hook(seen) for p in engine.params]
    engine.step(second)
    for hook in hooks:
        hook.remove()
    _sync(device)
    report = autopar.memory_report(engine)
    predicted = report.total("device")
    if report.peak_allocated is not None:
        measured, how = report.peak_allocated - base, "torch.cuda.max_memory_allocated"
    else:
        measured = _held_bytes(engine, grads) + engine.activation_meter.peak
        how = "CPU: tensors held + saved-tensor peak"
    mib = 2.0 ** 20
    return [["c", "peak memory, steady bf16 step", f"{measured / mib:.1f} MiB ({how})",
             f"{predicted / mib:.1f} MiB (memory_report)", f"{measured / predicted:.2f}", "ok"]]


def offload_rows(size: Size, device: torch.device) -> list[Row]:
    """Rows d: ``Engine.step`` with each offload mode against the device AdamW step."""
    _free(device)
    modes = {"optimizer": "optimizer", "optimizer+step": "optimizer+step", "device": None}
    runs = {name: autopar_engine(size, offload=mode).step for name, mode in modes.items()}
    medians, _, errors = time_steps(runs, size, device)
    rows = []
    for mode in ("optimizer", "optimizer+step"):
        check = f"offload={mode!r} step vs device AdamW"
        if mode in errors or "device" in errors:
            rows.append(["d", check, "-", "-", "-", f"FAIL: {errors.get(mode) or errors['device']}"])
            continue
        rows.append(["d", check, _ms(medians[mode], None), _ms(medians["device"], None),
                     f"{medians[mode] / medians['device']:.3f}", "ok"])
    return rows


def run_check(argv: list[str]) -> tuple[bool, str]:
    """``autopar check`` on the current grid, its printout kept: (verdict, the verdict line)."""
    parser = argparse.ArgumentParser()
    add_check_arguments(parser)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        ok = autopar_check.check(parser.parse_args(argv))
    verdict = [line for line in captured.getvalue().splitlines() if line.startswith(("PASS", "FAIL"))]
    return ok, verdict[-1] if verdict else ""


def _relative_error(verdict: str) -> str:
    found = re.search(r"relative to the update (\S+)", verdict)
    return found.group(1) if found else "?"


def check_args(device: torch.device) -> list[str]:
    """``autopar check``'s arguments for a grid on ``device`` (bound: see the module docstring)."""
    return ["--model", "llama", "--fp64", "--steps", "3", "--bound", "1e-5" if device.type == "cuda" else "1e-9"]


def pair_rank(rank: int, port: int, device: str, out: Any) -> None:
    """One of the two processes of row e: every grid in turn, each result put on ``out``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=PAIR_COLLECTIVE_S))
    for name, grid in PAIR_GRIDS.items():
        try:
            autopar.init(**grid, device=device, timeout=PAIR_COLLECTIVE_S)
            result: tuple[bool, str] = run_check(check_args(torch.device(device)))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            traceback.print_exc(file=sys.stderr)
            result = (False, f"rank {rank}: {_reason(exc)}")
        finally:
            autopar.destroy()
        out.put((name, rank, result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pair_rows(device: torch.device) -> list[Row]:
    """Rows e: two spawned processes on ``device``, gloo, each grid against serial."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=pair_rank, args=(r, port, str(device), out), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    got: dict[str, dict[int, tuple[bool, str]]] = {name: {} for name in PAIR_GRIDS}
    deadline = time.monotonic() + PAIR_TIMEOUT_S
    try:
        while sum(map(len, got.values())) < 2 * len(PAIR_GRIDS) and time.monotonic() < deadline:
            try:
                name, rank, result = out.get(timeout=1.0)
                got[name][rank] = result
            except queue.Empty:
                if all(p.exitcode is not None for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    rows = []
    for name, ranks in got.items():
        check = f"2 processes on {device}, gloo, {name} vs serial (fp64)"
        if len(ranks) < 2:
            rows.append(["e", check, "-", "serial", "-", "FAIL: a rank did not answer (crashed or hung)"])
            continue
        ok = all(v[0] for v in ranks.values())
        verdict = next((text for good, text in ranks.values() if not good and text), ranks[0][1])  # rank 0 prints
        rows.append(["e", check, "grid", "serial", f"max rel err {_relative_error(verdict)}",
                     "ok (PASS)" if ok else f"FAIL: {verdict.replace('|', '/')[:160]}"])
    return rows


def nccl_init(backend: str, device: torch.device) -> tuple[Row, autopar.Grid]:
    """The world of one for every in-process row: ``backend`` if it starts, else gloo on ``device``
    (then the init row is the failure, and the in-process rows still run)."""
    name = f"world of 1, autopar.init(backend={backend!r})"
    try:
        grid = autopar.init(backend=backend)
        return ["e", name, f"backend {grid.backend}, device {grid.device}", "-", "-", "ok"], grid
    except Exception as exc:  # noqa: BLE001 - reported in the table
        traceback.print_exc(file=sys.stderr)
        autopar.destroy()
        return ["e", name, "-", "-", "-", f"FAIL: {_reason(exc)}"], autopar.init(backend="gloo", device=device)


def world_of_one_rows(grid: autopar.Grid, size: Size) -> list[Row]:
    """Rows e: a step and ``autopar check``'s verdict on the world of one's backend."""
    engine = autopar_engine(size)
    losses = [engine.step(b) for b in _batches(size, grid.device)[:2]]
    step_ok = all(math.isfinite(v) for v in losses)
    ok, verdict = run_check(check_args(grid.device))
    return [["e", f"world of 1 on {grid.backend}: Engine.step", f"loss {losses[-1]:.4f}", "-", "-",
             "ok" if step_ok else "FAIL: non-finite loss"],
            ["e", f"world of 1 on {grid.backend}: autopar check verdict", "grid", "serial",
             f"max rel err {_relative_error(verdict)}", "ok (PASS)" if ok else f"FAIL: {verdict[:160]}"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny, on the CPU with gloo: proves the script runs")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device's dense bf16 peak (H200: 989)")
    args = parser.parse_args()
    start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.dry_run
    if args.dry_run:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
    size = FULL if cuda else DRY
    device = torch.device("cuda:0" if cuda else "cpu")
    peak = args.peak_tflops * 1e12 if cuda else None
    with torch.device("meta"):  # N of the MFU, tied embedding once; shapes only
        params = sum(p.numel() for p in _gpt2(size).parameters())
    init_row, grid = nccl_init("nccl" if cuda else "gloo", device)
    rows = guarded("a", ["1x1x1 bf16 step, eager"],
                   lambda: speed_row("a", "1x1x1 bf16 step, eager", size, device, params, peak, None))
    _free(device)
    compiled = f"1x1x1 bf16 step, torch.compile ({size.compile_backend})"
    rows += guarded("b", [compiled], lambda: speed_row("b", compiled, size, device, params, peak, size.compile_backend))
    rows += guarded("c", ["peak memory, steady bf16 step"], lambda: memory_row(size, device))
    rows += guarded("d", [f"offload={m!r} step vs device AdamW" for m in ("optimizer", "optimizer+step")],
                    lambda: offload_rows(size, device))
    rows.append(init_row)
    rows += guarded("e", [f"world of 1 on {grid.backend}: Engine.step",
                          f"world of 1 on {grid.backend}: autopar check verdict"],
                    lambda: world_of_one_rows(grid, DRY))
    autopar.destroy()
    _free(device)
    rows += guarded("e", [f"2 processes on {device}, gloo, {n} vs serial (fp64)" for n in PAIR_GRIDS],
                    lambda: pair_rows(device))
    where = torch.cuda.get_device_name(device) if cuda else "CPU dry run (tiny sizes, gloo; timings meaningless)"
    title = (f"GPU check: {where}; GPT-2 {params / 1e6:.1f} M params, batch {size.batch} x {size.seq}, bf16, AdamW, "
             f"median of {size.steps} steps after {size.warmup}; {time.perf_counter() - start:.0f} s")
    print(table(title, HEADER, rows))
    return 1 if any(r[-1].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
