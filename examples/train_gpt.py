"""Train a small GPT-2 on a public-domain corpus with autopar: the project's main demo job.

Why it looks like this: it is a complete training run that needs nothing but this repository.
The model comes from a config, the corpus ships in ``examples/data/``, and the tokenizer is a
byte-level BPE built from that corpus on first use, so no download happens. The same script runs
as one process or under any launcher, and the parallel layout is only a command-line flag:

    autopar run -n 8 examples/train_gpt.py          # the default 5D grid pp=2,dp=2,x=2
    torchrun --nproc_per_node 8 examples/train_gpt.py --grid pp=2,y=2,z=2
    mpirun -n 4 --oversubscribe python examples/train_gpt.py --grid dp=4
    srun -O -n 4 python examples/train_gpt.py --grid pp=2,x=2
    python examples/train_gpt.py --grid dp=1        # one process, the serial reference

Every rank draws the same seeded global batch and trains on its ``autopar.shard_batch`` share, so
a run on any grid follows the serial run. Rank 0 shows a progress bar and writes one CSV row per
step (loss, throughput, memory), a loss curve (``loss.png``) and a summary next to the CSV.
The shared parts (options, loop, logging) live in ``examples/common.py``.
"""
from transformers import GPT2Config, GPT2LMHeadModel

import common


def config(args, vocab: int, eos: int) -> GPT2Config:
    return GPT2Config(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, n_positions=args.seq_len,
                      n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # deterministic steps


if __name__ == "__main__":
    args = common.parser(__doc__, out="runs/gpt", grid="pp=2,dp=2,x=2", microbatches=4).parse_args()
    common.causal_lm_main(args, "GPT-2", GPT2LMHeadModel, config)
