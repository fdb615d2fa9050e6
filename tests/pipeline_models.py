"""Tiny models and batches for the pipeline tests (built from configs: nothing is downloaded)."""
from __future__ import annotations

import torch
import transformers
from torch import nn

VOCAB, SEQ = 64, 8


class LongSkip(nn.Module):
    """Blocks in a ModuleList, a skip from the embedding to the last block (it crosses every
    stage boundary), two tensors crossing each boundary, a non-tensor flag, and a buffer."""

    def __init__(self, layers: int = 4, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.aux = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, 3)
        self.register_buffer("shift", torch.linspace(-1, 1, width))

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 0.5) -> dict:
        x0 = self.embed(x) + self.shift
        h, side = x0, x0 * scale
        for i, (block, aux) in enumerate(zip(self.blocks, self.aux)):
            h = torch.tanh(block(h)) + side
            side = aux(side) * scale if i % 2 else aux(side)
        out = self.head(h + x0)
        return {"loss": nn.functional.mse_loss(out, y), "logits": out}


def build(name: str, layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    common = dict(num_hidden_layers=layers, num_attention_heads=2, hidden_size=16, intermediate_size=32)
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=layers, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg)
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, max_position_embeddings=SEQ, num_key_value_heads=2, **common))
    if name == "opt":
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=VOCAB, max_position_embeddings=SEQ, hidden_size=16, ffn_dim=32, num_hidden_layers=layers,
            num_attention_heads=2, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0))
    if name == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=VOCAB, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **common))
    if name == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=8, patch_size=4, num_channels=3, num_labels=5, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **common))
    if name == "whisper":  # encoder-decoder: both stacks are split, the encoder output crosses
        return transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
            vocab_size=VOCAB, d_model=16, encoder_layers=layers // 2, decoder_layers=layers // 2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
            num_mel_bins=8, max_source_positions=SEQ, max_target_positions=SEQ, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, dropout=0.0))
    if name == "skip":
        return LongSkip(layers)
    raise ValueError(name)


def batch(name: str, n: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(n, 3, 8, 8, generator=g), "labels": torch.randint(0, 5, (n,), generator=g)}
    if name == "skip":
        return {"x": torch.randn(n, 6, generator=g), "y": torch.randn(n, 3, generator=g)}
    if name == "whisper":
        return {"input_features": torch.randn(n, 8, 2 * SEQ, generator=g),
                "labels": torch.randint(3, VOCAB, (n, SEQ // 2), generator=g)}
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
