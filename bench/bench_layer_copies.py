"""Copies and collective bytes of ONE tensor-parallel linear layer, against serial and analytic.

    OMP_NUM_THREADS=1 python bench/bench_layer_copies.py [--ranks 8]

Why (issue 14.7): ``bench_intra_layer.py`` counts what the layers send, not what they copy. On a
GPU each extra copy of an activation or a weight block is a kernel and a full read and write of
memory, so every copy beyond the analytic minimum is counted here and traced to the line that
makes it. One ``nn.Linear(256, 1024)`` is built under ``autopar.auto_parallelize(chain=False)``
(the full-feature layout: input and output are whole activations), fed a global batch 8x32x256
(input requiring grad, as mid-model), and one forward+backward is counted on every rank, in
fp32 and under CPU bf16 autocast. The second call is the one counted (the first records the
prefetch order); grads are reset to None before each. dp = ranks / (x*y*z) only splits the batch.

Copies: a ``TorchDispatchMode`` sees every aten op below autograd and autocast, so autocast's
casts, ``.contiguous()`` (-> ``clone``), a ``reshape`` that cannot view (-> ``clone``) and the
autograd engine's casts back to the inputs' dtypes are all seen. Counted as copies: ``COPY_OPS``
(``copy_``, ``clone``, ``_to_copy``, ``cat``, ``stack``, ``index``, ``index_select``, the
``*_copy`` variants of views, ``constant_pad_nd``, ``repeat``), bytes = bytes written (the
result). Fills (``FILL_OPS``: ``zero_``, ``new_zeros``...) are counted apart. Seen too, marked
"backend": gloo's reduce-scatter copying its result out at ``Work.wait``; not seen: what gloo
copies on its own threads, and the collectives themselves.

Collective bytes: ``autopar.intra_layer.comm.COUNTER`` (ring volumes: all-gather/reduce-scatter
of an n-byte result over p ranks sends n(p-1)/p, an all-reduce 2n(p-1)/p).

Analytic volume per rank. T tokens per rank (global / (dp*z)), I = 256, O = 1024, W = O*I/(x*y)
elements of the (y, x) block, a = 4 bytes in fp32, 2 under bf16 (activations and gathered weight):
  "minimal": AxoNN's 3D matmul, activations sharded  | the full-feature layout adds ("analytic")
    all-gather W over z       (z-1)/z * W * a         |   all-gather out over y  (y-1)/y * T*O * a
    all-reduce out over x    2(x-1)/x * T*O/y * a     |   all-gather dx over x   (x-1)/x * T*I * a
    all-reduce dx over y     2(y-1)/y * T*I/x * a     |   reshard_after_forward: W gathered again
    reduce-scatter dW over z  (z-1)/z * W * 4 (fp32)  |   over z in backward     (z-1)/z * W * a
comm.py issues exactly these collectives: in fp32 measured = analytic on every grid; under bf16
dx's x all-gather goes in fp32 (the notes on the autograd engine's casts). This bench found two
defects, since fixed: the bias was added in fp32 under autocast (the output was fp32, unlike
serial, and its y all-gather sent twice the bytes), and the z gradient reduce-scatter zero-filled
and copied a full-size buffer even when the gradient itself would do. A third, the clone before
each x all-reduce, went when the all-reduce moved into the matmul's own autograd Function.

Analytic minimum of copies per rank. fp32: none but one re-layout per last-dim all-gather
(gloo/NCCL land the pieces rank-major; moving them to the last dim is one copy of the gathered
tensor): T*O*4 if y > 1, T*I*4 if x > 1. bf16: serial's six casts at this rank's shapes: input
slice T*I/x*2, weight piece W/z*2 (cast before the gather), bias slice O/y*2, dW block W*4 (fp32
for the reduce-scatter), db O/y*4, dx T*I*4 (fused with its re-layout when x > 1: gathered in
bf16, one cast-and-move), plus the output's re-layout T*O*2 if y > 1. Every copy found is listed
with its site (file:line in autopar/, or the autograd engine) and a verdict (``VERDICTS``).
"""
from __future__ import annotations

import argparse
import os
import textwrap
import traceback
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from world import spawn_gloo

COPY_OPS = frozenset({"copy_", "clone", "_to_copy", "cat", "stack", "index", "index_select", "narrow_copy",
                      "slice_copy", "select_copy", "view_copy", "as_strided_copy", "t_copy", "transpose_copy",
                      "permute_copy", "expand_copy", "unfold_copy", "constant_pad_nd", "repeat", "lift_fresh_copy"})
FILL_OPS = frozenset({"zero_", "fill_", "zeros", "zeros_like", "new_zeros", "full", "full_like", "new_full"})
GRIDS = [(4, 1, 1), (1, 4, 1), (1, 1, 4), (2, 2, 1), (2, 1, 2), (2, 2, 2)]
IN, OUT, BATCH, SEQ = 256, 1024, 8, 32
# (file, function, op) of a copy site -> (kind, why). kind: "min" (in the analytic minimum),
# "avoidable", "min+avoidable" (the first copy at the site is the minimum's, the rest are not),
# "backend" (the transport's, not autopar's). The first match wins: op with its dtype, then bare.
VERDICTS: dict[tuple[str, str, str], tuple[str, str]] = {
    ("comm.py", "_gather_last", "clone"): ("min", "re-layout of a last-dim all-gather (rank-major -> features last)"),
    ("comm.py", "_scatter_block_grad", "zero_"): ("min", "the padding tail of the reduce-scatter's flat buffer "
                                                  "(empty when W divides by z)"),
    ("comm.py", "_scatter_block_grad", "copy_"): ("min", "the bf16 dW block cast into the fp32 flat buffer of "
                                                  "the reduce-scatter (fp32 dW is reduced in place)"),
    ("comm.py", "forward", "_to_copy"): ("min", "autocast casts of the matmul operands (input slice; z = 1: block)"),
    ("comm.py", "start_depth_gather", "_to_copy"): ("min+avoidable", "weight piece cast to bf16 before its gather; "
                                                    "the backward re-gather casts the saved fp32 piece again "
                                                    "(saving the bf16 piece, W/z*2 bytes, would not)"),
    ("C++", "autograd engine", "_to_copy->float32"): ("min", "cast-backs to the fp32 inputs (dx slice; z = 1: dW); "
                                                      "the dx slice is cast before the x all-gather, so that "
                                                      "gather sends fp32 (bf16 'sent' excess, x > 1)"),
    ("layers.py", "linear_3d", "_to_copy"): ("min", "the bias cast to the matmul's dtype, as F.linear's autocast "
                                             "casts it"),
    ("linear.py", "forward", "_to_copy"): ("min", "autocast casts of input, weight and bias (F.linear)"),
    ("diagnostics.py", "wait", "copy_"): ("backend", "gloo's reduce_scatter_single copies its result into the "
                                          "output at Work.wait (c10d's, not autopar's)"),
    ("distributed_c10d.py", "reduce_scatter_single", "copy_"): ("backend", "the same, without autopar's recorder"),
}


def verdict(op: str, where: str, line: str) -> tuple[str, str, str]:
    """(kind, letter of its note, note) of a copy site."""
    file = line.split(":")[0].rsplit("/", 1)[-1]
    for key in ((file, where, op), (file, where, op.split("->")[0].removesuffix(" (fill)"))):
        if key in VERDICTS:
            return (*VERDICTS[key][:1], chr(ord("a") + list(VERDICTS).index(key)), VERDICTS[key][1])
    return "?", "?", "not classified"


def avoidable_bytes(c: "Count") -> int:
    sites: dict[tuple[str, str, str], list[int]] = {}
    for k in c.copies + c.fills:
        sites.setdefault((k.op, k.where, k.line), []).append(k.nbytes)
    kinds = {key: verdict(*key)[0] for key in sites}
    return sum(sum(v) if kinds[key] == "avoidable" else sum(v[1:]) if kinds[key] == "min+avoidable" else 0
               for key, v in sites.items())


def grids(world: int) -> list[tuple[int, int, int]]:
    return [g for g in GRIDS if world % (g[0] * g[1] * g[2]) == 0]


class Copy(NamedTuple):
    op: str      # aten op; "_to_copy->bfloat16" names the result dtype of a cast
    nbytes: int
    where: str   # function the copy is made in (autopar's innermost frame, else torch's)
    line: str    # "intra_layer/comm.py:109"


_PLUMBING = (os.path.abspath(__file__), f"torch{os.sep}_compile.py", f"torch{os.sep}_ops.py",
             f"{os.sep}_python_dispatch.py", f"{os.sep}eval_frame.py", f"{os.sep}contextlib.py")


def _site() -> tuple[str, str]:
    frames = [f for f in traceback.extract_stack() if not f.filename.endswith(_PLUMBING)]
    for f in reversed(frames):
        if f"{os.sep}autopar{os.sep}" in f.filename:
            return f.name, f"{f.filename.split(os.sep + 'autopar' + os.sep)[-1]}:{f.lineno}"
    if any(f.name == "_engine_run_backward" for f in frames):
        return "autograd engine", "C++"
    f = frames[-1]
    return f.name, f"{f.filename.split(os.sep + 'torch' + os.sep)[-1]}:{f.lineno}"


def _nbytes(out: Any) -> int:
    if isinstance(out, Tensor):
        return out.numel() * out.element_size()
    return sum(_nbytes(o) for o in out) if isinstance(out, (tuple, list)) else 0


class CopyCounter(TorchDispatchMode):
    """``with CopyCounter() as c:`` records every copy kernel (``c.copies``) and fill (``c.fills``)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[Copy] = []
        self.fills: list[Copy] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in COPY_OPS or name in FILL_OPS:
            if name == "_to_copy" and isinstance(out, Tensor):
                name += "->" + str(out.dtype).removeprefix("torch.")
            (self.copies if name.split("->")[0] in COPY_OPS else self.fills).append(Copy(name, _nbytes(out), *_site()))
        return out


class Count(NamedTuple):
    tokens: int
    out_dtype: str
    copies: list[Copy]
    fills: list[Copy]
    comm: dict[str, float]


def count_step(layer: nn.Module, inp: Tensor, bf16: bool) -> Count:
    """Copies, fills and intra-layer collective bytes of one forward+backward (the second call)."""
    from autopar.intra_layer.comm import COUNTER
    for counted in (False, True):
        for p in layer.parameters():
            p.grad = None
        x = inp.detach().requires_grad_()
        COUNTER.reset()
        COUNTER.enabled = counted
        with CopyCounter() if counted else nullcontext() as c:
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
                out = layer(x)
            out.backward(torch.ones_like(out))
        COUNTER.enabled = False
    return Count(inp.shape[0] * inp.shape[1], str(out.dtype).removeprefix("torch."), c.copies, c.fills,
                 dict(COUNTER.bytes))


def analytic_bytes(grid: tuple[int, int, int], tokens: int, bf16: bool) -> tuple[float, float]:
    """(minimal, analytic) collective bytes per rank, as derived in the module docstring."""
    x, y, z = grid
    a = 2 if bf16 else 4
    block = OUT * IN / (x * y)
    minimal = ((z - 1) / z * block * (a + 4) + 2 * (x - 1) / x * tokens * OUT / y * a
               + 2 * (y - 1) / y * tokens * IN / x * a)
    layout = (y - 1) / y * tokens * OUT * a + (x - 1) / x * tokens * IN * a + (z - 1) / z * block * a
    return minimal, minimal + layout


def analytic_copies(grid: tuple[int, int, int], tokens: int, bf16: bool) -> list[int]:
    """Bytes of each copy in the analytic minimum (module docstring)."""
    x, y, z = grid
    block = OUT * IN // (x * y)
    relayout = [tokens * OUT * (2 if bf16 else 4)] if y > 1 else []
    if not bf16:
        return relayout + ([tokens * IN * 4] if x > 1 else [])
    return relayout + [tokens * IN // x * 2, block // z * 2, OUT // y * 2, block * 4, OUT // y * 4, tokens * IN * 4]


def data() -> Tensor:
    return torch.randn(BATCH, SEQ, IN, generator=torch.Generator().manual_seed(0))


def _mb(b: float) -> str:
    return f"{b / 1e6:.3f}"


def report(ranks: list[dict], serial: dict[bool, Count]) -> None:
    world = len(ranks)
    print(f"one nn.Linear({IN}, {OUT}) under auto_parallelize(chain=False), global batch {BATCH}x{SEQ}x{IN}, "
          f"{world} gloo ranks on CPU;\none forward+backward per rank (rank 0; 'same': every rank counted the "
          "same copies and bytes); MB = 1e6 bytes;\ncopies: measured (analytic minimum); avoid: bytes of the "
          "copies and fills marked avoidable below\n")
    runs = [("serial", (1, 1, 1), bf16, serial[bf16]) for bf16 in (False, True)]
    runs += [(str(g), g, bf16, ranks[0][g, bf16]) for bf16 in (False, True) for g in grids(world)]
    for bf16 in (False, True):
        print(f"{'bf16 autocast' if bf16 else 'fp32'}: collective bytes sent vs analytic (full-feature layout) "
              "and minimal (sharded activations)")
        print(f"{'grid (x,y,z)':>12} {'tok/rank':>8} {'out':>8} {'copies':>7} {'copy MB':>15} {'fill MB':>7} "
              f"{'avoid MB':>8} {'sent MB':>7} {'analytic':>8} {'minimal':>7} {'sent/an':>7} {'same':>4}")
        for name, grid, b, c in runs:
            if b != bf16:
                continue
            minimal, full = analytic_bytes(grid, c.tokens, bf16)
            mins, sent = analytic_copies(grid, c.tokens, bf16), sum(c.comm.values())
            same = name == "serial" or all(r[grid, b].copies == c.copies and r[grid, b].comm == c.comm for r in ranks)
            ratio = f"{sent / full:.2f}" if full else "-"
            print(f"{name:>12} {c.tokens:>8} {c.out_dtype:>8} {f'{len(c.copies)} ({len(mins)})':>7} "
                  f"{f'{_mb(sum(k.nbytes for k in c.copies))} ({_mb(sum(mins))})':>15} "
                  f"{_mb(sum(k.nbytes for k in c.fills)):>7} {_mb(avoidable_bytes(c)):>8} {_mb(sent):>7} "
                  f"{_mb(full):>8} {_mb(minimal):>7} {ratio:>7} {'yes' if same else 'NO':>4}")
        print()
    print("Where each copy comes from (rank 0): count x op, MB, site, kind (note)")
    notes: dict[str, tuple[str, set[str]]] = {}
    for name, _, bf16, c in runs:
        print(f"{name} {'bf16' if bf16 else 'fp32'}:" + ("" if c.copies or c.fills else " none"))
        sites: dict[tuple[str, str, str], list[int]] = {}
        for k in c.copies + [f._replace(op=f.op + " (fill)") for f in c.fills]:
            sites.setdefault((k.op, k.where, k.line), []).append(k.nbytes)
        for (op, where, line), sizes in sites.items():
            kind, letter, note = verdict(op, where, line)
            notes.setdefault(letter, (note, set()))[1].add(f"{where} ({line})" if line == "C++" else line)
            print(f"  {len(sizes)}x {op:<19} {_mb(sum(sizes)):>6}  {f'{line} {where}':<40} {kind} ({letter})")
    print("\nnotes:")
    for letter, (note, lines) in sorted(notes.items()):
        print(textwrap.fill(f"({letter}) {', '.join(sorted(lines))}: {note}", 110, initial_indent="  ",
                            subsequent_indent="      "))


def worker(rank: int, world: int) -> None:
    import autopar
    results = {}
    for grid in grids(world):
        autopar.init(x=grid[0], y=grid[1], z=grid[2])
        torch.manual_seed(0)
        with autopar.auto_parallelize(chain=False):
            layer = nn.Linear(IN, OUT)
        local = autopar.shard_batch(data())
        for bf16 in (False, True):
            results[grid, bf16] = count_step(layer, local, bf16)
        autopar.destroy()
    everyone = [None] * world if rank == 0 else None
    dist.gather_object(results, everyone)
    if rank == 0:
        torch.manual_seed(0)
        layer = nn.Linear(IN, OUT)
        report(everyone, {bf16: count_step(layer, data(), bf16) for bf16 in (False, True)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    args = parser.parse_args()
    spawn_gloo(worker, args.ranks, args.ranks)


if __name__ == "__main__":
    main()
