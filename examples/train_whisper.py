"""Train a small Whisper (speech encoder-decoder) with autopar on generated "speech".

The audio is synthetic so nothing is downloaded: a transcript is a random sequence of tokens,
and its log-mel "recording" gives each token a fixed random spectrum over an equal share of the
frames, plus noise. The encoder reads the features, the decoder learns to write the transcript,
so both halves of the encoder-decoder train (and, under ``pp``, are split between stages).
``--pretrained DIR`` starts from a local Hugging Face Whisper folder (its feature and vocabulary
sizes are used).

    python examples/train_whisper.py --steps 100
    autopar run -n 4 --grid x=2,y=2 examples/train_whisper.py

Options, loop and logging: ``examples/common.py``; output in ``runs/whisper/``.
"""
from __future__ import annotations

from typing import Iterator

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

import autopar
import common

SPECIAL = 3  # token ids 0..2: start of transcript, end, padding


def speech(batch: int, vocab: int, mels: int, frames: int, length: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded global batches of (features, transcript); identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    spectra = torch.randn(vocab, mels, generator=gen)  # each token's "sound"
    per_token = frames // length
    while True:
        text = torch.randint(SPECIAL, vocab, (batch, length), generator=gen)
        sound = spectra[text].repeat_interleave(per_token, dim=1)          # batch x frames' x mels
        sound = torch.nn.functional.pad(sound, (0, 0, 0, frames - sound.shape[1]))
        features = sound.transpose(1, 2) + 0.5 * torch.randn(batch, mels, frames, generator=gen)
        yield {"input_features": features, "labels": text}


def main() -> None:
    p = common.parser(__doc__, out="runs/whisper", seq_len=8, lr=1e-3, layers=2)
    p.add_argument("--vocab", type=int, default=64, help="transcript vocabulary")
    p.add_argument("--mels", type=int, default=16, help="mel bins of the features")
    p.add_argument("--frames", type=int, default=64, help="feature frames per sample (2 x encoder positions)")
    args = p.parse_args()
    common.init(args)
    config = WhisperConfig(vocab_size=args.vocab, num_mel_bins=args.mels, d_model=args.hidden,
                           encoder_layers=args.layers, decoder_layers=args.layers, encoder_attention_heads=args.heads,
                           decoder_attention_heads=args.heads, encoder_ffn_dim=4 * args.hidden,
                           decoder_ffn_dim=4 * args.hidden, max_source_positions=args.frames // 2,
                           max_target_positions=max(args.seq_len, 8), dropout=0.0, attention_dropout=0.0,
                           activation_dropout=0.0, decoder_start_token_id=0, bos_token_id=0, eos_token_id=1,
                           pad_token_id=2, begin_suppress_tokens=None, suppress_tokens=None)
    model = common.build(lambda: WhisperForConditionalGeneration(config), args, WhisperForConditionalGeneration)
    cfg = model.config
    schedules: list = []
    engine = autopar.parallelize(model, optimizer=common.optimizer(args, schedules),
                                 num_microbatches=args.microbatches, clip_grad_norm=1.0)
    common.describe(model, f"{cfg.num_mel_bins} mels x {2 * cfg.max_source_positions} frames -> {args.seq_len} "
                           f"tokens; {args.steps} steps of {args.global_batch}")
    batches = speech(args.global_batch, cfg.vocab_size, cfg.num_mel_bins, 2 * cfg.max_source_positions,
                     args.seq_len, args.seed)
    common.train(engine, batches, args, "Whisper", "samples", args.global_batch, schedules)
    autopar.destroy()


if __name__ == "__main__":
    main()
