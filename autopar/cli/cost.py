"""A cost model of one training step per grid, and the planner that ranks grids by it.

``plan.predict`` counts, per rank and step, the bytes each axis sends and the memory a rank
holds; this module turns those counts into seconds on a described machine and ranks the grids.
Assumptions, each chosen to match what autopar's code really does:

* compute: ``6 * out * in`` FLOPs per token for every weight (forward + backward), divided over
  ``x * y`` when the weight is sharded and whole where ``auto_parallelize`` leaves it whole, plus
  ``12 * s * h`` per token and block for attention scores and values, which every x/y rank
  computes in full (autopar keeps full-feature activations between layers). A rank's tokens are
  ``global_batch * seq / (dp * z)``; the busiest stage holds ``blocks / pp`` blocks plus the
  weights outside the blocks (an untied embedding counts as a matmul: an over-estimate).
* communication per axis: its bytes over the link it crosses plus a latency per call. The rank
  order is ``pp, dp, z, y, x`` (x innermost, ``runtime/grid.py``) and nodes hold consecutive
  ranks, so an axis stays in a node when its stride times its size divides the ranks per node.
* overlap, only where the code overlaps: the data-parallel bucket reduction runs behind the
  backward of the last microbatch (earlier ones accumulate); z's forward all-gather is
  prefetched one layer ahead, so it hides behind forward compute, its backward reduce-scatter
  does not; the x/y collectives sit on the critical path of every layer, and so do pp's sends.
* pipeline bubble: ``(pp - 1)`` microbatch slots for ``gpipe``/``1f1b`` (the fraction
  ``(pp-1)/(M+pp-1)`` of the step), divided by the virtual stages for ``interleaved``, and 0
  for ``zerobubble`` (idealised: its deferred weight gradients fill every slot).
* memory: ``plan.predict``'s fp32 weights, gradients, AdamW state and 1F1B activations must fit
  in ``USABLE`` of the device (the rest goes to the allocator, buffers and the framework), and
  every data-parallel rank (``dp * z`` of them) needs whole sequences of the global batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Mapping

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..intra_layer.layout import divisible, linear_weight_spec
from ..runtime.grid import AXES, _strides
from . import models
from .plan import Shape, build_model, candidate_grids, predict, shape_of

GB, GIB = 1e9, 2.0 ** 30
USABLE = 0.9
"""Share of device memory the model's tensors may take: the CUDA context, the caching
allocator's fragmentation and the communication buffers take the rest."""


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One rank's device and links. Bandwidths are the bytes per second one rank sends in a
    ring collective (per direction); ``flops`` is sustained, not peak."""

    name: str
    flops: float          # dense matmul FLOP/s one rank sustains
    memory: float         # bytes of device memory per rank
    ranks_per_node: int
    intra_bw: float       # bytes/s per rank inside a node (NVLink, or shared memory)
    inter_bw: float       # bytes/s per rank across nodes (its share of InfiniBand)
    latency: float        # seconds per collective call or point-to-point message


# Sustained fp32 (TF32) matmul throughput taken as half of the dense TF32 peak (A100 156,
# H100/H200 SXM 495 TFLOP/s), as ``plan`` counts fp32 bytes; NVLink "effective" per direction.
PRESETS: dict[str, Hardware] = {
    "a100-80g": Hardware("a100-80g", 78e12, 80 * GIB, 8, 300 * GB, 25 * GB, 10e-6),
    "h100-80g": Hardware("h100-80g", 247e12, 80 * GIB, 8, 450 * GB, 50 * GB, 10e-6),
    "h200": Hardware("h200", 247e12, 141 * GB, 8, 450 * GB, 50 * GB, 10e-6),
    # This repository's 2-core CI machine as `autopar plan --world 8 --calibrate` measured it
    # (8 one-thread ranks sharing the cores, under a CI run): all ranks in one node.
    "cpu-gloo": Hardware("cpu-gloo", 17e9, 2.9 * GIB, 1 << 20, 1.1 * GB, 1.1 * GB, 181e-6),
}
ALIASES = {"a100": "a100-80g", "h100": "h100-80g"}


def load_hardware(spec: str | Mapping[str, object] | Hardware) -> Hardware:
    """A preset name (``h100``, ``a100-80g``, ...), a JSON file with ``Hardware``'s fields, or
    a mapping of them. Unknown names fail with the list of presets."""
    if isinstance(spec, Hardware):
        return spec
    if isinstance(spec, str):
        name = ALIASES.get(spec, spec)
        if name in PRESETS:
            return PRESETS[name]
        if not os.path.exists(spec):
            names = ", ".join(f.name for f in dataclasses.fields(Hardware))
            raise ValueError(f"unknown hardware {spec!r}: use a preset ({', '.join([*PRESETS, *ALIASES])}) "
                             f"or a JSON file with the fields {names}")
        with open(spec) as f:
            spec = {"name": os.path.basename(spec), **json.load(f)}
    fields = {f.name for f in dataclasses.fields(Hardware)}
    if set(spec) != fields:
        raise ValueError(f"hardware description needs exactly the fields {sorted(fields)}; got {sorted(spec)}")
    return Hardware(**spec)  # type: ignore[arg-type]


def intra_node(axis: str, sizes: Mapping[str, int], ranks_per_node: int) -> bool:
    """Whether every group of ``axis`` lies inside one node: its members are ``stride`` apart
    and span ``stride * size`` consecutive ranks, which stay in a node of ``ranks_per_node``
    consecutive ranks exactly when that span divides it (or the whole world fits in a node)."""
    span = _strides(sizes)[axis] * sizes[axis]
    return math.prod(sizes[a] for a in AXES) <= ranks_per_node or ranks_per_node % span == 0


@dataclasses.dataclass(frozen=True)
class Cost:
    """One grid's predicted step: seconds by part (exposed communication per axis) and bytes."""

    sizes: dict[str, int]
    microbatches: int
    compute: float
    comm: dict[str, float]     # exposed seconds per axis: x, y, z, dp, pp
    links: dict[str, str]      # "intra" / "inter" per axis of size > 1
    bubble: float
    memory: float              # bytes per rank, busiest stage
    infeasible: str            # why the grid cannot run ("" when it can)

    @property
    def step(self) -> float:
        return self.compute + sum(self.comm.values()) + self.bubble


def _work(shape: Shape, sizes: Mapping[str, int], global_batch: int) -> tuple[float, int]:
    """FLOPs of the busiest stage per step, and its sharded weights (each makes x and y
    collectives in forward and backward, and z's gather and reduce-scatter)."""
    pp, x, y, z = sizes["pp"], sizes["x"], sizes["y"], sizes["z"]
    tp = {"x": x, "y": y, "z": z}
    tokens = global_batch * shape.seq_len / (sizes["dp"] * z)
    ends = min(pp, 2)
    flops, sharded = 0.0, 0.0
    for layer in shape.layers:
        share = 1 / pp if layer.in_block else 1 / ends
        spec = linear_weight_spec((layer.out_features, layer.in_features), tp)
        split = divisible(spec.full_shape, spec.dim_axes, tp)
        flops += 6 * layer.out_features * layer.in_features / (x * y if split else 1) * tokens * share
        sharded += share if split else 0
    if shape.hidden:
        flops += 12 * shape.seq_len * shape.hidden * tokens * shape.blocks / pp
    return flops, round(sharded)


def step_cost(shape: Shape, sizes: Mapping[str, int], global_batch: int, microbatches: int, hw: Hardware,
              schedule: str = "1f1b", virtual_stages: int = 2) -> Cost:
    """The predicted step of ``sizes`` on ``hw`` (see the module notes for what is assumed)."""
    sizes = dict(sizes)
    pp, dp, z, m = sizes["pp"], sizes["dp"], sizes["z"], microbatches
    fig = predict(shape, sizes, global_batch, m)
    flops, sharded = _work(shape, sizes, global_batch)
    compute = flops / hw.flops
    forward, last_backward = compute / 3, 2 * compute / 3 / m
    y_bytes = fig["y part of x/y"]
    sent = {"x": fig["comm x/y"] - y_bytes, "y": y_bytes, "z": fig["comm z"], "dp": fig["comm dp"],
            "pp": fig["comm pp"]}
    calls = {"x": 2 * sharded * m, "y": 2 * sharded * m, "z": 2 * sharded * m, "dp": 0, "pp": 2 * m}
    links, raw = {}, {}
    for axis, nbytes in sent.items():
        if sizes[axis] == 1:
            raw[axis] = 0.0
            continue
        links[axis] = "intra" if intra_node(axis, sizes, hw.ranks_per_node) else "inter"
        bw = hw.intra_bw if links[axis] == "intra" else hw.inter_bw
        raw[axis] = nbytes / bw + calls[axis] * hw.latency
    comm = dict(raw)
    comm["z"] = max(0.0, raw["z"] / 2 - forward) + raw["z"] / 2   # forward gathers prefetched
    comm["dp"] = max(0.0, raw["dp"] - last_backward)              # buckets overlap the last backward
    slot = (compute + comm["x"] + comm["y"] + comm["z"] + comm["pp"]) / m
    stalls = {"gpipe": pp - 1, "1f1b": pp - 1, "interleaved": (pp - 1) / virtual_stages, "zerobubble": 0}
    if schedule not in stalls:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {tuple(stalls)}")
    memory = fig["weights"] + fig["grads"] + fig["adamw"] + fig["activations"]
    why = ""
    if global_batch % (dp * z):
        why = f"global batch {global_batch} does not split over dp*z = {dp * z}"
    elif memory > USABLE * hw.memory:
        why = f"{memory / GIB:.1f} GiB > {USABLE:.0%} of {hw.memory / GIB:.1f} GiB"
    return Cost(sizes, m, compute, comm, links, slot * stalls[schedule], memory, why)


def default_microbatches(sizes: Mapping[str, int], global_batch: int) -> int:
    """1 without a pipeline; else 4 per stage (bubble under 20% for 1f1b), at most one sequence
    per microbatch on each data-parallel rank."""
    if sizes["pp"] == 1:
        return 1
    return max(1, min(4 * sizes["pp"], global_batch // (sizes["dp"] * sizes["z"])))


def rank_grids(shape: Shape, world: int, global_batch: int, hw: Hardware, microbatches: int | None = None,
               schedule: str = "1f1b", grids: list[dict[str, int]] | None = None) -> list[Cost]:
    """Every candidate grid's cost, feasible ones first, then by predicted step time; ties go to
    less memory, then to the grid's sizes in rank order, so the order is the same on every rank."""
    grids = grids if grids is not None else candidate_grids(world, shape.blocks)
    costs = [step_cost(shape, g, global_batch, microbatches or default_microbatches(g, global_batch), hw, schedule)
             for g in grids]
    return sorted(costs, key=lambda c: (bool(c.infeasible), c.step, c.memory, tuple(c.sizes[a] for a in AXES)))


def print_ranking(costs: list[Cost], hw: Hardware, top: int) -> None:
    """The ranked table: step time and its parts in ms, memory in GiB, each axis's link."""
    print(f"hardware {hw.name}: {hw.flops / 1e12:.3g} TFLOP/s, {hw.memory / GIB:.1f} GiB, {hw.ranks_per_node} "
          f"ranks/node, {hw.intra_bw / GB:.3g} GB/s intra, {hw.inter_bw / GB:.3g} GB/s inter, "
          f"{hw.latency * 1e6:.0f} us/call; ms per step, busiest stage")
    print(f"{'pp dp  z  y  x':>14} {'M':>3} {'step':>9} {'compute':>9} {'bubble':>8} " + " ".join(
        f"{a:>8}" for a in ("x", "y", "z", "dp", "pp")) + f" {'memory':>7}  links / why not")
    for c in costs[:top]:
        g = " ".join(f"{c.sizes[a]:>2}" for a in AXES)
        links = ",".join(f"{a}:{k}" for a, k in c.links.items())
        print(f"{g:>14} {c.microbatches:>3} {c.step * 1e3:9.2f} {c.compute * 1e3:9.2f} {c.bubble * 1e3:8.2f} "
              + " ".join(f"{c.comm[a] * 1e3:8.2f}" for a in ("x", "y", "z", "dp", "pp"))
              + f" {c.memory / GIB:7.2f}  {c.infeasible or links or '-'}")
    if len(costs) > top:
        print(f"... {len(costs) - top} more grids (--top)")


def _allreduce_worker(rank: int, store_path: str, numel: int, out: str) -> None:
    """One of the two calibration ranks: times a large all-reduce (bandwidth) and small ones
    (latency); rank 0 writes ``[seconds per large, seconds per small]`` to ``out``."""
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    big, small = torch.ones(numel), torch.ones(1)
    dist.all_reduce(big)
    dist.all_reduce(small)
    times = []
    for tensor, reps in ((big, 5), (small, 50)):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(tensor)
        times.append((time.perf_counter() - t0) / reps)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def _matmul_worker(index: int, out_dir: str, seconds: float = 1.0) -> None:
    """One of the ranks that share the machine during calibration: 512^3 fp32 matmuls on one
    thread (autopar's gloo ranks run one each) for ``seconds``; writes its FLOP/s."""
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    a @ a
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        reps += 1
    with open(os.path.join(out_dir, f"flops{index}"), "w") as f:
        f.write(str(2 * 512 ** 3 * reps / (time.perf_counter() - t0)))


def calibrate(world: int, numel: int = 1 << 22, at_once: int = 16) -> Hardware:
    """This machine measured as ``cpu-gloo`` for ``world`` ranks on it. FLOP/s: the mean rate of
    ``min(world, at_once)`` one-thread matmul processes running together, since ranks share the
    cores (and whatever else runs), scaled down further when ``world`` exceeds them; bandwidth: a
    2-rank gloo all-reduce of ``numel`` floats (a 2-rank ring sends the tensor's bytes once);
    latency: one of a single float. Memory is the RAM over the ranks."""
    together = min(world, at_once)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_matmul_worker, args=(tmp,), nprocs=together, start_method="spawn")
        rates = [float(open(os.path.join(tmp, f"flops{i}")).read()) for i in range(together)]
        out = os.path.join(tmp, "times.json")
        mp.start_processes(_allreduce_worker, args=(os.path.join(tmp, "store"), numel, out), nprocs=2,
                           start_method="spawn")
        with open(out) as f:
            big, small = json.load(f)
    flops = sum(rates) / world  # the cores' total rate, shared by the ranks
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    bw = 4 * numel / max(big - small, 1e-9)
    return Hardware("cpu-gloo (measured)", flops, ram / world, 1 << 20, bw, bw, small)


def _module(model: object) -> nn.Module:
    """``model`` as a module to read shapes from: itself, or built on meta (no memory, no
    weights) from a transformers config or what ``autopar plan --model`` takes."""
    if isinstance(model, nn.Module):
        return model
    with torch.device("meta"):
        if isinstance(model, str):  # a family or a config.json / folder, as `autopar plan --model` takes
            return build_model(argparse.Namespace(factory=None, model=model))
        import transformers as tf

        if isinstance(model, tf.PretrainedConfig):
            names = [n for n in getattr(model, "architectures", None) or () if hasattr(tf, n)]
            return getattr(tf, names[0])(model) if names else tf.AutoModelForCausalLM.from_config(model)
    raise ValueError(f"grid='auto': model must be an nn.Module, a transformers config, a family name "
                     f"({', '.join(models.FAMILIES)}) or a config.json path, not {type(model).__name__}")


def choose_grid(world: int, model: object, hardware: str | Mapping[str, object] | Hardware, global_batch: int,
                seq_len: int | None = None, schedule: str = "1f1b") -> Cost:
    """The top of ``rank_grids`` for ``world`` ranks: what ``autopar.init(grid="auto")`` uses.
    Only shapes and the hardware's fixed figures go in, so every rank gets the same answer."""
    ranked = rank_grids(shape_of(_module(model), seq_len), world, global_batch, load_hardware(hardware),
                        schedule=schedule)
    if ranked[0].infeasible:
        raise ValueError(f"grid='auto': no grid of {world} ranks can train this model; the closest, "
                         f"{ranked[0].sizes}: {ranked[0].infeasible}")
    return ranked[0]
