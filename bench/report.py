"""Run every benchmark in bench/ and write bench/REPORT.md: one section per capability.

    OMP_NUM_THREADS=1 python bench/report.py [--only intra_layer pipeline] [--timeout 900]

Why a runner and not one big benchmark: each ``bench_*.py`` already prints its tables with
autopar next to the peer a user would otherwise pick (DTensor TP, torch.distributed.pipelining,
DDP, torch's fused AdamW) and next to the analytic optimum, in one run on one machine. The
report only runs them all on the same machine in the same session, records the machine and the
exact commands, and puts the tables in one file, so its numbers can be quoted and reproduced.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
CAPABILITIES = {  # bench script stem -> section title
    "bench_intra_layer": "3D tensor parallelism vs DTensor tensor parallel",
    "bench_pipeline": "Pipeline parallelism vs torch.distributed.pipelining",
    "bench_data_parallel": "Data parallelism vs DDP",
    "bench_offload": "CPU offload vs torch's fused AdamW",
    "bench_composition": "The 5D composition: memory and communication per rank",
    "bench_overhead": "One device: a 1x1x1 grid against plain PyTorch",
    "bench_pipeline_memory": "Peak memory per rank (pp and z)",
    "bench_setup": "Group set-up at scale (issue 16.1)",
    "bench_moe": "MoE expert sharding (issue 13.3)",
    "bench_layer_copies": "Copies and bytes per tensor-parallel layer (issue 14.7)",
    "bench_vocab_loss": "The LM loss on vocabulary shards vs gathered logits (issue 14.6)",
}


# Sections written by commands this runner does not run (hardware it cannot assume; `autopar plan --dry-run`;
# `bench/bench_planner.py`, whose timings need a quiet machine).
OTHER_SECTIONS = ("One GPU: `bench/gpu_check.py`", "Dry run at cluster size (issue 16.2)",
                  "Planner: predicted vs measured step time (issue 16.3)")


def kept_sections(report: Path, rerun: set[str]) -> list[str]:
    """The blocks of an existing report that this run does not produce again: other benchmarks'
    (``--only``) and ``OTHER_SECTIONS`` (``bench/gpu_check.py``'s table from a GPU machine), so
    regenerating never drops them. A block runs from its ``## `` title to the next title of a
    capability or other section (the benchmarks' own output has ``## `` headings too)."""
    if not report.exists():
        return []
    titles = set(CAPABILITIES.values()) | set(OTHER_SECTIONS)
    blocks: list[tuple[str, list[str]]] = []
    for line in report.read_text().splitlines():
        if line.startswith("## ") and line[3:].strip() in titles:
            blocks.append((line[3:].strip(), [line]))
        elif blocks:
            blocks[-1][1].append(line)
    return ["\n".join(lines).rstrip() + "\n" for title, lines in blocks if title not in rerun]


def machine() -> str:
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True,
                            text=True).stdout.strip()
    return (f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, GPU: {cuda}; commit {commit or '?'}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def run(script: Path, timeout: float) -> tuple[str, float, int]:
    """(output, seconds, exit code) of one benchmark."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=BENCH.parent, env=env, capture_output=True,
                              text=True, timeout=timeout)
        out, code = proc.stdout + (f"\n[stderr]\n{proc.stderr[-3000:]}" if proc.returncode else ""), proc.returncode
    except subprocess.TimeoutExpired as e:
        out, code = f"{e.stdout or ''}\n[timed out after {timeout:.0f} s]", 124
    return out.strip(), time.perf_counter() - start, code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=[s.removeprefix("bench_") for s in CAPABILITIES],
                   help="run these benchmarks only (default: all)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    p.add_argument("--out", type=Path, default=BENCH / "REPORT.md")
    args = p.parse_args()
    chosen = [s for s in CAPABILITIES if args.only is None or s.removeprefix("bench_") in args.only]
    sections = [f"# autopar benchmark report\n\nMachine: {machine()}\n\nReproduce: "
                f"`OMP_NUM_THREADS=1 python bench/report.py`. Each section is one benchmark's own output: "
                "autopar next to the peer and the analytic figures, measured in this run.\n"]
    failed = 0
    for stem in chosen:
        print(f"running {stem}.py ...", file=sys.stderr, flush=True)
        out, seconds, code = run(BENCH / f"{stem}.py", args.timeout)
        failed += code != 0
        status = "" if code == 0 else f" **(exit code {code})**"
        sections.append(f"## {CAPABILITIES[stem]}\n\n`OMP_NUM_THREADS=1 python bench/{stem}.py` "
                        f"({seconds:.0f} s){status}\n\n```\n{out}\n```\n")
    sections += kept_sections(args.out, {CAPABILITIES[stem] for stem in chosen})
    args.out.write_text("\n".join(sections))
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
