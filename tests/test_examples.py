"""Every example script trains 2 steps on 2-4 ranks under a grid named as ``autopar run --grid``
names it (``AUTOPAR_GRID``, read by ``autopar.init``), and writes its CSV and loss curve. Tiny
sizes: the point is that each family runs under a grid and logs, not that it learns.

One example is started by the real ``autopar run`` (a launcher process and fresh ranks); the
others run as ``__main__`` in the session's rank pool, with ``AUTOPAR_GRID`` set as the launcher
sets it. A launched example costs ~17 CPU-s, nearly all of it three processes importing torch
and transformers; in the pool it costs what its two steps cost. What the launch adds (the
environment it hands each rank) is the same for every script, so one launched case covers it;
``test_cli`` and ``test_real_launch`` cover the launchers themselves.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import runpy
import sys
from pathlib import Path

import pytest

from slurm import REPO, clean_env, run

EXAMPLES = REPO / "examples"
TINY = ["--steps", "2", "--global-batch", "4", "--seq-len", "16", "--layers", "2", "--hidden", "32", "--heads", "4"]
CASES = {  # id: (script, ranks, grid, extra arguments, throughput column)
    "gpt-pp2-x2": ("train_gpt.py", 4, "pp=2,x=2", ["--microbatches", "2"], "tokens_per_s"),
    "opt-dp2": ("train_opt.py", 2, "dp=2", [], "tokens_per_s"),
    "gpt-neo-y2": ("train_gpt_neo.py", 2, "y=2", [], "tokens_per_s"),
    "gptj-pp2": ("train_gpt_neo.py", 2, "pp=2", ["--gptj", "--microbatches", "2"], "tokens_per_s"),
    "bert-z2": ("train_bert.py", 2, "z=2", [], "samples_per_s"),
    "electra-pp2": ("train_electra.py", 2, "pp=2", ["--microbatches", "2"], "tokens_per_s"),
    "vit-x2": ("train_vit.py", 2, "x=2", ["--image-size", "16"], "samples_per_s"),
    "whisper-x2": ("train_whisper.py", 2, "x=2", ["--seq-len", "8"], "samples_per_s"),
}


def _tiny_llama(folder: Path) -> None:
    """A local Hugging Face folder for --pretrained (vocabulary of the example's tokenizer)."""
    import transformers as tf

    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)


def _check_outputs(out: Path, rate: str) -> None:
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(float(r["loss"])) and float(r[rate]) > 0 and float(r["model_mem_mib"]) > 0, r
    assert (out.parent / "loss.png").stat().st_size > 0


def run_script(script: str, grid: str, args: list[str]) -> str:
    """A pool rank's share of ``autopar run --grid GRID script ARGS``: the script as ``__main__``
    with ``AUTOPAR_GRID`` set; returns what it printed."""
    saved = sys.argv, sys.path[:], os.environ.get("AUTOPAR_GRID")
    sys.argv = [str(EXAMPLES / script), *args]
    sys.path.insert(0, str(EXAMPLES))  # as for a script run by path: its folder first, for `import common`
    os.environ["AUTOPAR_GRID"] = grid
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        if saved[2] is None:
            del os.environ["AUTOPAR_GRID"]
        else:
            os.environ["AUTOPAR_GRID"] = saved[2]
    return printed.getvalue()


@pytest.mark.parametrize("case", list(CASES))
def test_example_two_steps(case, tmp_path, request):
    script, ranks, grid, extra, rate = CASES[case]
    out = tmp_path / "metrics.csv"
    pool = request.getfixturevalue(f"pool{ranks}")
    printed = pool.run(run_script, script, grid, [*TINY, *extra, "--out", str(out)])
    assert "summary: 2 steps" in printed[0], printed[0]
    _check_outputs(out, rate)


def test_launched_example_from_a_pretrained_folder(tmp_path):
    """``autopar run -n 2 --grid x=2 examples/train_llama.py --pretrained DIR``: fresh processes,
    the grid handed over by the launcher, the weights and tokenizer-less folder read from disk."""
    out = tmp_path / "metrics.csv"
    _tiny_llama(tmp_path / "hf")
    args = [*TINY, "--out", str(out), "--pretrained", str(tmp_path / "hf")]
    rc, log = run([sys.executable, "-m", "autopar.cli", "run", "-n", "2", "--grid", "x=2",
                   str(EXAMPLES / "train_llama.py"), *args], clean_env(), timeout=300)
    assert rc == 0, log
    assert "AUTOPAR_GRID=x=2" in log and "summary: 2 steps" in log, log
    _check_outputs(out, "tokens_per_s")
