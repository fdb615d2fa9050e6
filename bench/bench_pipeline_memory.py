"""Per-rank memory of pp and z grids after ``parallelize`` and at the peak of a step, against the ideal.

4 gloo ranks run a Llama built from a small config (``--layers`` blocks, ``--width`` wide,
vocabulary 4096, untied head) on the grids pp=1 x dp=4 (the reference), pp=2 x dp=2, pp=4,
z=4, x=2 x z=2 and pp=2 x z=2, with 1F1B over M=4 microbatches when pp > 1. Grids with x, y or z
build the model under ``autopar.auto_parallelize()``. For each grid, the fullest rank (largest
peak) is shown. With n = pp*x*y*z and P the serial model's parameter bytes, the ideals are

* state: parameters and gradients P/n, AdamW's two states 2P/n (dp replicates them: zero=0);
* weights at peak: the parameters plus the z-gathered (y, x) blocks autograd still holds for
  backward at the activation peak. Resharded after forward (FSDP's ``reshard_after_forward``),
  that is P/n plus a layer or two; a gathered block saved for backward makes it P/(n/z), i.e.
  weights at 1/(x*y) rather than 1/(x*y*z) (issue 14.5). The blocks are told apart from other
  saved tensors by wrapping ``intra_layer.comm.start_depth_gather``; ``memory_report`` counts
  them as activations, so the activation column here is the report's figure less them;
* activations: what the reference grid saves per sample, times the rows a rank holds in flight,
  over pp: rows/(dp*z) per rank, M microbatches of which 1F1B keeps min(pp, M) on the first
  stage, each of about 1/pp of the model. x and y are taken to shard no activations (autopar's
  default layout replicates a layer's input over them), so a ratio below 1 there is their gain.
* after parallelize: bytes of parameters the rank holds with real storage (stand-ins for
  other stages' weights hold none), with and without ``sample_batch`` (without it the split is
  made at the first forward, and the stage is moved to the device only then).

The last column is the most sent p2p tensors held at once, their bytes, and those bytes over one
microbatch's boundary hidden state (rows x seq x width fp32): microbatches' worth in flight, which
1F1B bounds by pp (a message may carry more than the hidden state, so the count is an upper one).
On gloo a send's ``Work.is_completed()`` stays False until ``wait()``, so there every send of the
step is held until its end: M hidden states on an end stage, 2M on a middle one.
On CUDA, ``torch.cuda.max_memory_allocated`` would replace the tensor counts; this machine has
no GPU, so the figures are tensor bytes counted exactly.

    OMP_NUM_THREADS=1 python bench/bench_pipeline_memory.py [--layers 8] [--width 128]
"""
from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import transformers

import autopar
from autopar.intra_layer import comm, prefetch
from autopar.offload import ActivationMeter
from autopar.pipeline.comm import P2P
from tables import table  # bench/ is on sys.path: the scripts run as files
from world import spawn_gloo

WORLD = 4
ROWS = 16  # global batch
M = 4  # microbatches when pp > 1
GRIDS: list[tuple[dict[str, int], bool]] = [  # (grid, split in parallelize via sample_batch)
    (dict(pp=1, dp=4), False), (dict(pp=2, dp=2), False), (dict(pp=2, dp=2), True),
    (dict(pp=4, dp=1), False), (dict(pp=4, dp=1), True),
    (dict(dp=1, z=4), False), (dict(dp=1, x=2, z=2), False), (dict(pp=2, dp=1, z=2), True),
]
MIB = 2 ** 20


class _Blocks:
    """Storages of z-gathered weight blocks made during a step, held until ``clear`` so that no
    activation can reuse an address and be mistaken for one."""

    def __init__(self) -> None:
        self.storages: dict[int, torch.UntypedStorage] = {}

    def wrap(self, gather: Callable[..., tuple[torch.Tensor, Any]]) -> Callable[..., tuple[torch.Tensor, Any]]:
        def tracked(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
            flat, work = gather(*args, **kwargs)
            storage = flat.untyped_storage()
            self.storages[storage.data_ptr()] = storage
            return flat, work
        return tracked

    def clear(self) -> None:
        self.storages.clear()


class _SplitMeter(ActivationMeter):
    """autopar's activation meter, also following the gathered blocks among the saved tensors:
    ``blocks_at_peak`` is how many of the peak's bytes were weight blocks. It hooks the meter's
    own per-storage bookkeeping (``_pack``, ``_release``, ``_live``), so both count alike."""

    def __init__(self, model: torch.nn.Module, blocks: _Blocks) -> None:
        super().__init__(model)
        self.blocks, self.block_bytes, self.blocks_at_peak = blocks, 0, 0

    def _pack(self, tensor: torch.Tensor) -> Any:
        key = tensor.untyped_storage().data_ptr()
        new = key not in self._live
        before = self.peak
        saved = super()._pack(tensor)
        if new and key in self._live and key in self.blocks.storages:
            self.block_bytes += self._live[key][1]
        if self.peak != before:
            self.blocks_at_peak = self.block_bytes
        return saved

    def _release(self, key: int) -> None:
        if self._live[key][0] == 1 and key in self.blocks.storages:
            self.block_bytes -= self._live[key][1]
        super()._release(key)


@contextlib.contextmanager
def _tracking(blocks: _Blocks, sent: list[int]) -> Iterator[None]:
    """Every depth gather (on demand in ``comm``, prefetched in ``prefetch``) recorded, and the
    most bytes of sent p2p tensors held at once in ``sent[0]`` (``P2P`` counts only tensors)."""
    originals, post = (comm.start_depth_gather, prefetch.start_depth_gather), P2P.post

    def counted(self: P2P, *args: Any, **kwargs: Any) -> Any:
        out = post(self, *args, **kwargs)
        sent[0] = max(sent[0], sum(t.numel() * t.element_size() for _, t in self.in_flight))
        return out

    comm.start_depth_gather = prefetch.start_depth_gather = blocks.wrap(originals[0])
    P2P.post = counted
    try:
        yield
    finally:
        (comm.start_depth_gather, prefetch.start_depth_gather), P2P.post = originals, post
        blocks.clear()


def _model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=args.width, intermediate_size=2 * args.width,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=args.seq)
    return transformers.LlamaForCausalLM(cfg)


def _batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (ROWS, args.seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _held(model: torch.nn.Module) -> int:
    """Parameter bytes with real storage behind them, each storage once: other stages' stand-ins
    and tied weights must not count."""
    seen, total = set(), 0
    for p in model.parameters():
        storage = p.untyped_storage()
        if storage.nbytes() >= p.numel() * p.element_size() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += p.numel() * p.element_size()
    return total


def measure(grid: dict[str, int], args: argparse.Namespace, sample: bool) -> dict[str, int]:
    """One step of ``grid`` on this rank: bytes held after parallelize and at the step's peak."""
    sizes = autopar.init(**grid).sizes
    batch = autopar.shard_batch(_batch(args))
    sharded = sizes["x"] * sizes["y"] * sizes["z"] > 1
    with autopar.auto_parallelize() if sharded else contextlib.nullcontext():
        model = _model(args)
    engine = autopar.parallelize(model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                                 num_microbatches=M if sizes["pp"] > 1 else 1,
                                 sample_batch=batch if sample else None)
    after = _held(engine.model)
    blocks, sent = _Blocks(), [0]
    engine.activation_meter = meter = _SplitMeter(engine.model, blocks)
    with _tracking(blocks, sent):
        engine.step(batch)
    dev = autopar.memory_report(engine).on_device
    in_flight = engine.pipeline.p2p.peak_in_flight if engine.pipeline is not None else 0
    autopar.destroy()
    return {"after": after, "params": dev["parameters"], "grads": dev["gradients"],
            "opt": dev["optimizer_state"], "blocks": meter.blocks_at_peak,
            "acts": dev["activations"] - meter.blocks_at_peak, "in_flight": in_flight, "sent": sent[0]}


def _rows(results: list[tuple[dict[str, int], bool, list[dict[str, int]]]], full: int,
          args: argparse.Namespace) -> list[list[str]]:
    """Table rows: the fullest rank of each grid against the ideals of the module docstring."""
    reference = max(r["acts"] for r in results[0][2])  # pp=1 x dp=4: every rank ROWS/4 samples
    per_sample = reference / (ROWS // WORLD)
    out = []
    for grid, sample, got in results:
        sizes = {a: grid.get(a, 1) for a in ("pp", "dp", "x", "y", "z")}
        n = sizes["pp"] * sizes["x"] * sizes["y"] * sizes["z"]
        rows, m = ROWS // (sizes["dp"] * sizes["z"]), M if sizes["pp"] > 1 else 1
        expected = per_sample * rows / m * min(sizes["pp"], m) / sizes["pp"]
        r = max(got, key=lambda g: g["params"] + g["grads"] + g["opt"] + g["blocks"] + g["acts"])
        ideal, weights = full / n, r["params"] + r["blocks"]
        peak = weights + r["grads"] + r["opt"] + r["acts"]
        when = "-" if sizes["pp"] == 1 else ("parallelize" if sample else "first forward")
        hidden = rows // m * args.seq * args.width * 4  # one microbatch's boundary hidden state
        sent = max(g["sent"] for g in got)
        name = " x ".join(f"{a}={s}" for a, s in sizes.items() if s > 1)
        out.append([name, when, f"{max(g['after'] for g in got) / MIB:.2f}", f"{ideal / MIB:.2f}",
                    f"{r['params'] / MIB:.2f} / {r['grads'] / MIB:.2f} / {r['opt'] / MIB:.2f}",
                    f"{r['params'] / ideal:.2f} / {r['grads'] / ideal:.2f} / {r['opt'] / (2 * ideal):.2f}",
                    f"{r['blocks'] / MIB:.2f}", f"{weights / ideal:.2f}",
                    f"{weights / (ideal * sizes['z']):.2f}" if sizes["z"] > 1 else "-",
                    f"{r['acts'] / MIB:.2f}", f"{expected / MIB:.2f}", f"{r['acts'] / expected:.2f}",
                    f"{peak / MIB:.2f}", f"{peak / (4 * ideal + expected):.2f}",
                    f"{max(g['in_flight'] for g in got)} / {sent / 2**10:.0f} / {sent / hidden:.1f}"])
    return out


def worker(rank: int, args: argparse.Namespace) -> None:
    """Every grid in turn on one world (imports once); rank 0 prints the table."""
    full = sum(p.numel() * p.element_size() for p in _model(args).parameters())
    results, start = [], time.perf_counter()
    for grid, sample in GRIDS:
        mine = measure(grid, args, sample)
        gathered: list[Any] = [None] * WORLD
        dist.all_gather_object(gathered, mine)
        results.append((grid, sample, gathered))
    if rank == 0:
        print(f"\n{WORLD} gloo ranks, Llama {args.layers} blocks x {args.width}, vocab 4096, seq {args.seq}, "
              f"P = {full / MIB:.2f} MiB of fp32 parameters, global batch {ROWS}, AdamW, zero=0; "
              f"1F1B with M={M} when pp > 1; fullest rank, MiB; n = pp*x*y*z\n")
        print(table("Peak memory per rank (pp and z)",
                    ["grid", "pp split made in", "params held after parallelize", "ideal P/n",
                     "params / grads / AdamW at peak", "x ideal (P/n, P/n, 2P/n)", "z blocks saved at peak",
                     "weights at peak x P/n", "weights at peak x zP/n", "activations", "expected",
                     "x expected", "peak total", "x (4P/n + expected)",
                     "p2p sends held (max): tensors / KiB / x one hidden state"],
                    _rows(results, full, args)))
        print("\nweights at peak = parameters + z-gathered blocks saved for backward at the activation peak; "
              "activations exclude those blocks. Params held after parallelize without sample_batch are the "
              "host-side model until the first forward splits it; the device then receives the stage only. "
              f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    spawn_gloo(worker, WORLD, args)
