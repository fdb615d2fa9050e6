"""Train a small GPT-Neo (EleutherAI) on the shipped corpus with autopar.

GPT-Neo alternates global and local (sliding-window) attention layers; pass ``--gptj`` to train
its successor GPT-J instead (rotary positions, attention and MLP in parallel). ``--pretrained DIR``
starts from a local Hugging Face folder of either.

    python examples/train_gpt_neo.py --steps 50
    autopar run -n 2 --grid y=2 examples/train_gpt_neo.py
    autopar run -n 4 --grid pp=2,x=2 examples/train_gpt_neo.py --gptj --microbatches 2

Options, loop and logging: ``examples/common.py``; output in ``runs/gpt_neo/`` (``runs/gptj/``).
"""
from pathlib import Path

from transformers import GPTJConfig, GPTJForCausalLM, GPTNeoConfig, GPTNeoForCausalLM

import common


def neo_config(args, vocab: int, eos: int) -> GPTNeoConfig:
    return GPTNeoConfig(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, hidden_size=args.hidden,
                        num_layers=args.layers, num_heads=args.heads, max_position_embeddings=args.seq_len,
                        # alternate global and local layers; an odd count is all global
                        attention_types=[[["global", "local"], args.layers // 2]] if args.layers % 2 == 0
                        else [[["global"], args.layers]], window_size=32,
                        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)


def gptj_config(args, vocab: int, eos: int) -> GPTJConfig:
    return GPTJConfig(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, n_embd=args.hidden, n_layer=args.layers,
                      n_head=args.heads, rotary_dim=args.hidden // args.heads // 2, n_positions=args.seq_len,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


if __name__ == "__main__":
    p = common.parser(__doc__, out="runs/gpt_neo")
    p.add_argument("--gptj", action="store_true", help="train GPT-J instead (output in runs/gptj/ by default)")
    args = p.parse_args()
    if args.gptj:
        if args.out == p.get_default("out"):
            args.out = Path("runs/gptj/metrics.csv")
        common.causal_lm_main(args, "GPT-J", GPTJForCausalLM, gptj_config)
    else:
        common.causal_lm_main(args, "GPT-Neo", GPTNeoForCausalLM, neo_config)
