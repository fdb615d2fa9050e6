"""Tiny models and batches for the 3D tensor-parallel tests (no downloads: configs only).

Every feature dimension is even so each layer shards on grids of 2; ViT's 3-class head does not
divide y=2 and so also covers the replicated fallback inside a real model. Dropout is off so a
serial and a parallel step see the same function.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import Linear  # bound before any auto_parallelize block on purpose

V = 64


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16, padding_idx=3)
        self.up = Linear(16, 32)
        self.down = torch.nn.modules.linear.Linear(32, 16)
        self.head = nn.Linear(16, V, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(self.emb(ids)))))


class Unchainable(nn.Module):
    """Layers that follow each other but must keep the full-feature layout: ``up``'s output also
    feeds a residual, a LayerNorm (mixes features) sits between ``fc`` and ``proj``, ``gate``'s
    output is cut in two along the features; every other output goes into a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.up, self.down = nn.Linear(16, 16), nn.Linear(16, 16)
        self.fc, self.norm, self.proj = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16)
        self.gate, self.out = nn.Linear(16, 32), nn.Linear(16, 16)
        self.head = nn.Linear(16, V, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.up(self.emb(ids))
        h = self.down(torch.relu(h)) + h
        h = h + self.proj(self.norm(self.fc(h)))
        a, b = self.gate(h).chunk(2, dim=-1)
        return self.head(h + self.out(a * torch.sigmoid(b)))


def sequential() -> nn.Module:
    return nn.Sequential(nn.Embedding(V, 16), nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16), nn.Tanh(),
                         nn.Linear(16, V))


def gpt2() -> nn.Module:
    import transformers as tf
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                            resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0,
                                            eos_token_id=0))


def llama() -> nn.Module:
    import transformers as tf
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def opt() -> nn.Module:
    import transformers as tf
    return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=V, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
                                          dropout=0, attention_dropout=0, bos_token_id=0, eos_token_id=0,
                                          pad_token_id=1))


def bert() -> nn.Module:
    import transformers as tf
    return tf.BertForMaskedLM(tf.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0,
                                            attention_probs_dropout_prob=0))


def vit() -> nn.Module:
    import transformers as tf
    return tf.ViTForImageClassification(tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                                     num_labels=3, hidden_dropout_prob=0,
                                                     attention_probs_dropout_prob=0))


def gpt_neo() -> nn.Module:
    import transformers as tf
    return tf.GPTNeoForCausalLM(tf.GPTNeoConfig(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2,
                                                max_position_embeddings=32, attention_types=[[["global", "local"], 1]],
                                                window_size=4, embed_dropout=0, attention_dropout=0, resid_dropout=0,
                                                bos_token_id=0, eos_token_id=0))


def gemma() -> nn.Module:
    """Its embedding is ``GemmaTextScaledWordEmbedding`` (an ``nn.Embedding`` subclass), tied to
    the exact ``nn.Linear`` LM head."""
    import transformers as tf
    return tf.GemmaForCausalLM(tf.GemmaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                              max_position_embeddings=32, tie_word_embeddings=True))


def bart() -> nn.Module:
    """Encoder-decoder whose shared embedding is ``BartScaledWordEmbedding`` (scale_embedding
    on), tied to encoder, decoder and LM head."""
    import transformers as tf
    return tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        dropout=0, attention_dropout=0, activation_dropout=0, scale_embedding=True, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None))


BUILDERS = {"mlp": MLP, "sequential": sequential, "unchainable": Unchainable, "gpt2": gpt2, "llama": llama,
            "opt": opt, "bert": bert, "vit": vit, "gpt_neo": gpt_neo}


def lm_loss(output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(output.flatten(0, 1), batch[1].flatten())


def batch(name: str, n: int = 8, seq: int = 6):
    """The global batch (same on every rank); plain models take (ids, labels), HF ones a dict."""
    g = torch.Generator().manual_seed(7)
    if name == "vit":
        return {"pixel_values": torch.randn(n, 3, 8, 8, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}
    ids = torch.randint(0, V, (n, seq), generator=g)
    if name in ("mlp", "sequential", "unchainable"):
        return ids, torch.randint(0, V, (n, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def chain_layers(name: str, model: nn.Module) -> None:
    """The sharded layout where the model allows it: MLP up->down, Llama q/k/v->o and
    gate/up->down (heads and GQA groups split evenly over y=2)."""
    from autopar.intra_layer import chain

    if name == "mlp":
        chain([model.up], model.down)
    elif name == "llama":
        for block in model.model.layers:
            chain([block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj], block.self_attn.o_proj)
            chain([block.mlp.gate_proj, block.mlp.up_proj], block.mlp.down_proj)
    else:
        raise ValueError(f"no chain for {name}")
