"""Pre-train a small ELECTRA discriminator with autopar: spot the replaced tokens.

ELECTRA learns by replaced-token detection: some tokens of a corpus window are swapped for
others and the model labels every position original (0) or replaced (1). Here the replacements
are drawn at random (the paper uses a small generator network; the discriminator's training is
the same). ``--pretrained DIR`` continues from a local Hugging Face ELECTRA discriminator.

    python examples/train_electra.py --steps 100
    autopar run -n 4 --grid pp=2,x=2 examples/train_electra.py --microbatches 2

Options, loop and logging: ``examples/common.py``; output in ``runs/electra/``.
"""
from __future__ import annotations

from typing import Iterator

import torch
from transformers import ElectraConfig, ElectraForPreTraining

import autopar
import common

REPLACED = 0.15  # fraction of positions replaced


def corrupted(tokens: torch.Tensor, vocab: int, batch: int, seq_len: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Corpus windows with ``REPLACED`` of the positions swapped for random tokens; the labels
    mark the positions whose token really changed. Seeded, so identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    for window in common.lm_batches(tokens, batch, seq_len, seed):
        ids = window["input_ids"].clone()
        swap = torch.rand(ids.shape, generator=gen) < REPLACED
        ids[swap] = torch.randint(vocab, (int(swap.sum()),), generator=gen)
        yield {"input_ids": ids, "labels": (ids != window["input_ids"]).long()}


def main() -> None:
    args = common.parser(__doc__, out="runs/electra", lr=1e-3).parse_args()
    common.init(args)
    tok = common.tokenizer(args)
    tokens = torch.tensor(tok.encode(common.CORPUS.read_text(encoding="utf-8")).ids, dtype=torch.long)
    vocab = tok.get_vocab_size()
    config = ElectraConfig(vocab_size=vocab, embedding_size=args.hidden // 2, hidden_size=args.hidden,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           intermediate_size=4 * args.hidden, max_position_embeddings=args.seq_len,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = common.build(lambda: ElectraForPreTraining(config), args, ElectraForPreTraining)
    schedules: list = []
    engine = autopar.parallelize(model, optimizer=common.optimizer(args, schedules),
                                 num_microbatches=args.microbatches, clip_grad_norm=1.0)
    common.describe(model, f"corpus {len(tokens):,} tokens, {REPLACED:.0%} replaced; {args.steps} steps of "
                           f"{args.global_batch} x {args.seq_len} tokens")
    common.train(engine, corrupted(tokens, vocab, args.global_batch, args.seq_len, args.seed), args,
                 "ELECTRA discriminator", "tokens", args.global_batch * args.seq_len, schedules)
    autopar.destroy()


if __name__ == "__main__":
    main()
