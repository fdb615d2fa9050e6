"""Train a small Llama with grouped-query attention (GQA) on the shipped corpus with autopar.

Llama's attention has fewer key/value heads than query heads (``--kv-heads``); under
``auto_parallelize`` the q/k/v projections are sharded like any other Linear, so GQA needs no
special case. Start from your own checkpoint with ``--pretrained DIR`` (a local Hugging Face
folder; its ``tokenizer.json`` is used when present).

    python examples/train_llama.py --steps 50
    autopar run -n 4 --grid x=2,y=2 examples/train_llama.py
    autopar run -n 4 --grid pp=2,dp=2 examples/train_llama.py --microbatches 2

Options, loop and logging: ``examples/common.py``; output in ``runs/llama/``.
"""
from transformers import LlamaConfig, LlamaForCausalLM

import common

KV_HEADS = 2  # --heads must be a multiple of it: 4 query heads share each k/v head pair


def config(args, vocab: int, eos: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, hidden_size=args.hidden,
                       intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=KV_HEADS,
                       max_position_embeddings=args.seq_len)


if __name__ == "__main__":
    common.causal_lm_main(common.parser(__doc__, out="runs/llama").parse_args(), "Llama (GQA)", LlamaForCausalLM, config)
