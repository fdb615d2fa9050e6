"""Every example script trains 2 steps on 2-4 ranks, started by ``autopar run`` (so the grid
reaches ``autopar.init`` through AUTOPAR_GRID), and writes its CSV and loss curve. Tiny sizes:
the point is that each family runs under a grid and logs, not that it learns."""
from __future__ import annotations

import csv
import math
import sys

import pytest

from slurm import REPO, clean_env, run

TINY = ["--steps", "2", "--global-batch", "4", "--seq-len", "16", "--layers", "2", "--hidden", "32", "--heads", "4"]
CASES = {  # id: (script, ranks, grid, extra arguments, throughput column)
    "gpt-pp2-x2": ("train_gpt.py", 4, "pp=2,x=2", ["--microbatches", "2"], "tokens_per_s"),
    "llama-x2-pretrained": ("train_llama.py", 2, "x=2", [], "tokens_per_s"),
    "opt-dp2": ("train_opt.py", 2, "dp=2", [], "tokens_per_s"),
    "gpt-neo-y2": ("train_gpt_neo.py", 2, "y=2", [], "tokens_per_s"),
    "gptj-pp2": ("train_gpt_neo.py", 2, "pp=2", ["--gptj", "--microbatches", "2"], "tokens_per_s"),
    "bert-z2": ("train_bert.py", 2, "z=2", [], "samples_per_s"),
    "electra-pp2": ("train_electra.py", 2, "pp=2", ["--microbatches", "2"], "tokens_per_s"),
    "vit-x2": ("train_vit.py", 2, "x=2", ["--image-size", "16"], "samples_per_s"),
    "whisper-x2": ("train_whisper.py", 2, "x=2", ["--seq-len", "8"], "samples_per_s"),
}


def _tiny_llama(folder) -> None:
    """A local Hugging Face folder for --pretrained (vocabulary of the example's tokenizer)."""
    import transformers as tf

    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)


@pytest.mark.parametrize("case", list(CASES))
def test_example_two_steps(case, tmp_path):
    script, ranks, grid, extra, rate = CASES[case]
    out = tmp_path / "metrics.csv"
    args = [*TINY, *extra, "--out", str(out)]
    if "pretrained" in case:
        _tiny_llama(tmp_path / "hf")
        args += ["--pretrained", str(tmp_path / "hf")]
    rc, log = run([sys.executable, "-m", "autopar.cli", "run", "-n", str(ranks), "--grid", grid,
                   str(REPO / "examples" / script), *args], clean_env(), timeout=300)
    assert rc == 0, log
    assert f"AUTOPAR_GRID={grid}" in log and "summary: 2 steps" in log, log
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(float(r["loss"])) and float(r[rate]) > 0 and float(r["model_mem_mib"]) > 0, r
    assert (tmp_path / "loss.png").stat().st_size > 0
