"""3D tensor parallelism: communication volume, step time against DTensor TP, memory per rank.

    OMP_NUM_THREADS=1 python bench/bench_intra_layer.py [--ranks 4] [--hidden 256] [--steps 5]

Spawns ``--ranks`` gloo processes on this machine and prints three tables (rank 0):

1. bytes each rank sends per training step inside the layers (counted by wrapping the
   collectives, ``intra_layer.comm.COUNTER``, on the second step: the first one is where the
   automatic layout is chosen), in the default full-feature layout
   (``auto_parallelize(chain=False)``), with the automatic detection (``chain=True``, the
   default: it proves up -> GELU -> down, not attention), and with every pair chained by hand
   (``chain``, q/k/v -> o too), next to the analytic volume of the 3D parallel matmul with
   sharded activations for the same grid: the ratios are the cost of the re-layouts and what
   chaining saves;
2. the time of one training step against PyTorch's own tensor parallelism (DTensor
   ``ColwiseParallel``/``RowwiseParallel`` via ``parallelize_module``) on the same ranks, model
   and global batch;
3. parameter, gradient and AdamW-state bytes per rank against the ideal full/(x*y*z).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import autopar
from autopar.intra_layer import chain
from autopar.intra_layer.comm import COUNTER
from world import spawn_gloo


class Block(nn.Module):
    """Pre-norm transformer block (attention + MLP), six ``nn.Linear`` layers."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.o = nn.Linear(hidden, hidden)
        self.up, self.down = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, _ = h.shape
        a = self.norm1(h)
        q, k, v = (p(a).view(b, s, -1, h.shape[-1] // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        h = h + self.o(a)
        return h + self.down(F.gelu(self.up(self.norm2(h))))


def build(hidden: int, layers: int = 2) -> nn.Module:
    return nn.Sequential(*(Block(hidden, 4) for _ in range(layers)))


def analytic_bytes(model: nn.Module, tokens: int, sizes: dict[str, int]) -> float:
    """Per-rank bytes of the 3D matmul with activations that stay sharded between layers:
    all-gather W over z + reduce-scatter dW over z, all-reduce of the output over x (forward)
    and of the input gradient over y (backward). ``tokens``: this rank's tokens (batch / z)."""
    x, y, z = sizes["x"], sizes["y"], sizes["z"]
    total = 0.0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            out, inp = m.out_features, m.in_features
            total += 2 * out * inp / (x * y) * (z - 1) / z
            total += 2 * tokens * out / y * (x - 1) / x + 2 * tokens * inp / x * (y - 1) / y
    return 4 * total


def _timed_steps(step, steps: int) -> float:
    for _ in range(2):
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    return (time.perf_counter() - start) / steps


def chain_blocks(model: nn.Module) -> None:
    """The sharded layout: q/k/v hand their head blocks to o, up its block to down."""
    for block in model:
        chain([block.q, block.k, block.v], block.o)
        chain([block.up], block.down)


LAYOUTS = ("default", "auto", "sharded")  # chain=False, chain=True (automatic), chained by hand


def run_autopar(grid: tuple[int, int, int], layout: str, args, data: torch.Tensor) -> dict:
    x, y, z = grid
    autopar.init(x=x, y=y, z=z)
    torch.manual_seed(0)
    with autopar.auto_parallelize(chain=layout == "auto"):
        model = build(args.hidden)
    if layout == "sharded":
        chain_blocks(model)
    engine = autopar.parallelize(model, lambda p: torch.optim.AdamW(p, lr=1e-3),
                                 loss_fn=lambda out, batch: out.square().mean())
    local = autopar.shard_batch(data)
    engine.step(local)  # the automatic detection observes (and replays) the first forward
    COUNTER.reset()
    COUNTER.enabled = True
    engine.step(local)
    COUNTER.enabled = False
    measured = sum(COUNTER.bytes.values())
    sizes = dict(engine.grid.sizes)
    seconds = _timed_steps(lambda: engine.step(local), args.steps)
    params = sum(p.numel() * p.element_size() for p in engine.params)
    state = sum(t.numel() * t.element_size() for s in engine.optimizer.state.values()
                for t in s.values() if t.dim() > 0)
    autopar.destroy()
    return dict(measured=measured, analytic=analytic_bytes(model, local.shape[0] * local.shape[1], sizes),
                seconds=seconds, params=params, state=state)


def run_dtensor(args, data: torch.Tensor) -> float:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = build(args.hidden)
    plan = {}
    for i in range(len(model)):
        plan.update({f"{i}.q": ColwiseParallel(), f"{i}.k": ColwiseParallel(), f"{i}.v": ColwiseParallel(),
                     f"{i}.o": RowwiseParallel(), f"{i}.up": ColwiseParallel(), f"{i}.down": RowwiseParallel()})
    model = parallelize_module(model, mesh, plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        model(data).square().mean().backward()
        opt.step()
        opt.zero_grad()

    return _timed_steps(step, args.steps)


def worker(rank: int, world: int, args) -> None:
    data = torch.randn(args.batch, args.seq, args.hidden, generator=torch.Generator().manual_seed(0))
    grids = [g for g in [(world, 1, 1), (1, world, 1), (1, 1, world), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2)]
             if g[0] * g[1] * g[2] == world]
    results = {(g, layout): run_autopar(g, layout, args, data) for g in grids for layout in LAYOUTS}
    dtensor = run_dtensor(args, data)
    serial_params = sum(p.numel() * 4 for p in build(args.hidden).parameters())
    if rank == 0:
        print(f"\nmodel: 2 pre-norm blocks, hidden {args.hidden}, global batch {args.batch}x{args.seq} tokens, "
              f"{world} gloo ranks on CPU, fp32\n")
        print("1. intra-layer communication per rank per step (MB): default full-feature layout, automatic")
        print("   detection (up->down found), sharded layout by hand (q/k/v->o, up->down), analytic 3D")
        print("   matmul with sharded activations")
        print(f"{'grid (x,y,z)':>14} {'default':>9} {'auto':>9} {'sharded':>9} {'analytic':>9} "
              f"{'default/an':>11} {'auto/an':>8} {'sharded/an':>11}")
        for g in grids:
            d, a, c = (results[g, layout] for layout in LAYOUTS)
            an = max(d['analytic'], 1)
            print(f"{str(g):>14} {d['measured'] / 1e6:9.3f} {a['measured'] / 1e6:9.3f} {c['measured'] / 1e6:9.3f} "
                  f"{an / 1e6:9.3f} {d['measured'] / an:11.2f} {a['measured'] / an:8.2f} {c['measured'] / an:11.2f}")
        print(f"\n2. step time (AdamW, {args.steps} steps after 2 warm-up)")
        print(f"{'run':>32} {'ms/step':>9} {'vs DTensor':>11}")
        print(f"{'DTensor col/row TP=' + str(world):>32} {dtensor * 1e3:9.1f} {1.0:11.2f}")
        for (g, layout), r in results.items():
            name = f"autopar {g} {layout}"
            print(f"{name:>32} {r['seconds'] * 1e3:9.1f} {r['seconds'] / dtensor:11.2f}")
        print("\n3. bytes per rank (params = grads; AdamW state = exp_avg + exp_avg_sq)")
        ideal = serial_params / world
        print(f"{'grid (x,y,z)':>14} {'params MB':>10} {'grads MB':>9} {'AdamW MB':>9} {'ideal MB':>9} {'x ideal':>8}")
        for g in grids:
            r = results[g, "default"]
            print(f"{str(g):>14} {r['params'] / 1e6:10.3f} {r['params'] / 1e6:9.3f} {r['state'] / 1e6:9.3f} "
                  f"{ideal / 1e6:9.3f} {r['params'] / ideal:8.3f}")
        print(f"(serial model: {serial_params / 1e6:.3f} MB of parameters)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    spawn_gloo(worker, args.ranks, args.ranks, args)


if __name__ == "__main__":
    main()
