"""``bench/bench_layer_copies.py``'s copy counter and analytic volumes, checked by hand on one process.

Why: the benchmark's verdicts ("avoidable" against "analytic minimum") are only as good as its
counting dispatch mode and its formulas; both are cheap to check without spawning ranks.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_layer_copies as bench  # noqa: E402


def test_counter_sees_copies_and_fills_not_views() -> None:
    a = torch.randn(8, 16)
    with bench.CopyCounter() as c:
        a.view(16, 8), a.narrow(1, 0, 4), a.t(), a.reshape(-1)  # views: nothing copied
        a.clone()                                                # 512 bytes
        a.t().contiguous()                                       # a clone: 512
        torch.cat([a, a])                                        # 1024
        a.to(torch.bfloat16)                                     # 256
        a.t().reshape(-1)                                        # not viewable: a clone, 512
        torch.zeros(10)                                          # a fill, 40
    assert [(k.op, k.nbytes) for k in c.copies] == [
        ("clone", 512), ("clone", 512), ("cat", 1024), ("_to_copy->bfloat16", 256), ("clone", 512)]
    assert [(k.op, k.nbytes) for k in c.fills] == [("zeros", 40)]


def test_serial_linear_copies_by_hand() -> None:
    torch.manual_seed(0)
    layer, inp = nn.Linear(bench.IN, bench.OUT), bench.data()
    fp32 = bench.count_step(layer, inp, bf16=False)
    assert fp32.copies == [] and fp32.comm == {} and fp32.out_dtype == "float32"
    bf16 = bench.count_step(layer, inp, bf16=True)
    tokens = bench.BATCH * bench.SEQ  # 256
    forward = {tokens * 256 * 2, 1024 * 256 * 2, 1024 * 2}     # input, weight, bias to bf16
    backward = {tokens * 256 * 4, 1024 * 256 * 4, 1024 * 4}   # dx, dW, db back to fp32
    assert {k.nbytes for k in bf16.copies if k.op == "_to_copy->bfloat16"} == forward
    assert {k.nbytes for k in bf16.copies if k.op == "_to_copy->float32"} == backward
    assert len(bf16.copies) == 6 and bf16.out_dtype == "bfloat16"
    assert sorted(bench.analytic_copies((1, 1, 1), tokens, True)) == sorted(forward | backward)
    assert all(bench.verdict(k.op, k.where, k.line)[0] == "min" for k in bf16.copies)
    assert bench.avoidable_bytes(bf16) == 0


def test_analytic_volume_by_hand() -> None:
    # (2,2,2), 128 tokens, fp32: W = 1024*256/4 = 65536 elements.
    # minimal: gather + reduce-scatter W over z 2 * 1/2 * 65536*4, all-reduce out over x
    # 2 * 1/2 * 128*512*4, all-reduce dx over y 2 * 1/2 * 128*128*4
    minimal, full = bench.analytic_bytes((2, 2, 2), 128, False)
    assert minimal == 262144 + 262144 + 65536
    # layout: all-gather out over y 1/2 * 128*1024*4, dx over x 1/2 * 128*256*4, re-gather W 1/2 * 65536*4
    assert full == minimal + 262144 + 65536 + 131072
    assert bench.analytic_bytes((1, 1, 1), 256, True) == (0, 0)
    assert bench.analytic_copies((2, 2, 2), 128, False) == [128 * 1024 * 4, 128 * 256 * 4]
