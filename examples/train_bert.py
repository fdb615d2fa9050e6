"""Fine-tune a small BERT for sequence classification with autopar: which book is a verse from?

The task is real and ships with the repository: every verse of the corpus (``examples/data``) is
labelled Genesis (0) or Exodus (1), and BERT learns to tell them apart from the text alone.
Sequences are padded to ``--seq-len`` with an attention mask. ``--pretrained DIR`` fine-tunes a
local Hugging Face BERT folder instead of a small fresh model (a new 2-class head is added when the
folder has none).

    python examples/train_bert.py --steps 100
    autopar run -n 4 --grid x=2,y=2 examples/train_bert.py

Options, loop and logging: ``examples/common.py``; output in ``runs/bert/``.
"""
from __future__ import annotations

import re
from typing import Iterator

import torch
from transformers import BertConfig, BertForSequenceClassification

import autopar
import common

BOOKS = ("Genesis", "Exodus")


def verses(tok, seq_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, book label) of every verse, padded or cut to ``seq_len``."""
    ids, labels, book = [], [], None
    for line in common.CORPUS.read_text(encoding="utf-8").splitlines():
        heading = re.fullmatch(r"(\w+) \d+", line)
        if heading:
            book = BOOKS.index(heading.group(1))
        elif line.strip():
            ids.append(tok.encode(line).ids[:seq_len])
            labels.append(book)
    mask = torch.zeros(len(ids), seq_len, dtype=torch.long)
    padded = torch.full((len(ids), seq_len), pad, dtype=torch.long)
    for i, seq in enumerate(ids):
        padded[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    return padded, mask, torch.tensor(labels)


def batches(data: tuple[torch.Tensor, ...], batch: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded global batches of random verses (identical on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    ids, mask, labels = data
    while True:
        pick = torch.randint(len(ids), (batch,), generator=gen)
        yield {"input_ids": ids[pick], "attention_mask": mask[pick], "labels": labels[pick]}


def main() -> None:
    args = common.parser(__doc__, out="runs/bert", seq_len=64, lr=5e-4).parse_args()
    common.init(args)
    tok = common.tokenizer(args)
    pad = tok.token_to_id(common.EOS) or 0
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, pad_token_id=pad,
                        max_position_embeddings=args.seq_len, num_labels=len(BOOKS),
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = common.build(lambda: BertForSequenceClassification(config), args, BertForSequenceClassification)
    schedules: list = []
    engine = autopar.parallelize(model, optimizer=common.optimizer(args, schedules),
                                 num_microbatches=args.microbatches, clip_grad_norm=1.0)
    data = verses(tok, args.seq_len, pad)
    common.describe(model, f"{len(data[0]):,} verses of {BOOKS}; {args.steps} steps of {args.global_batch}")
    common.train(engine, batches(data, args.global_batch, args.seed), args, "BERT fine-tuning", "samples",
                 args.global_batch, schedules)
    autopar.destroy()


if __name__ == "__main__":
    main()
