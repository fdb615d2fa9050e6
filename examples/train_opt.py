"""Train a small OPT (Meta's decoder-only LM) on the shipped corpus with autopar.

OPT has learned positional embeddings and an optional projection between the word embedding and
the hidden size; both are ordinary layers to ``auto_parallelize``. ``--pretrained DIR`` starts
from a local Hugging Face folder (e.g. one written by ``autopar.save_pretrained``).

    python examples/train_opt.py --steps 50
    autopar run -n 4 --grid x=2,z=2 examples/train_opt.py

Options, loop and logging: ``examples/common.py``; output in ``runs/opt/``.
"""
from transformers import OPTConfig, OPTForCausalLM

import common


def config(args, vocab: int, eos: int) -> OPTConfig:
    return OPTConfig(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                     hidden_size=args.hidden, word_embed_proj_dim=args.hidden, ffn_dim=4 * args.hidden,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     max_position_embeddings=args.seq_len, dropout=0.0, attention_dropout=0.0)


if __name__ == "__main__":
    common.causal_lm_main(common.parser(__doc__, out="runs/opt").parse_args(), "OPT", OPTForCausalLM, config)
