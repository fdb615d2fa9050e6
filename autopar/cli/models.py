"""Models for ``autopar check`` and ``autopar plan``: one per supported family, from a config
(nothing is downloaded), and the global batch each one trains on.

``tiny`` configs make ``check`` fast enough to run on a laptop: every feature dimension divides
grids of 2 and 4, and dropout is off so a serial and a parallel step compute the same function.
``plan`` uses the family's default (full-size) config, built on the meta device, for shapes only.
A user's own model comes in through ``--factory module:function`` (see :func:`load_factory`).
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

import torch
from torch import nn

from .options import FAMILIES  # noqa: F401 - the families build() knows, listed where the options are

V = 128  # vocabulary of the tiny language models
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _families(tiny: bool) -> dict[str, Callable[[], Any]]:
    """family name -> a function returning its config (``tiny`` or the library default)."""
    import transformers as tf

    if not tiny:
        return {"gpt2": tf.GPT2Config, "llama": tf.LlamaConfig, "opt": tf.OPTConfig, "gpt-neo": tf.GPTNeoConfig,
                "gptj": tf.GPTJConfig, "bert": tf.BertConfig, "electra": tf.ElectraConfig, "vit": tf.ViTConfig,
                "whisper": tf.WhisperConfig}
    lm = dict(vocab_size=V, bos_token_id=0, eos_token_id=0)
    return {
        "gpt2": lambda: tf.GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0, embd_pdrop=0,
                                      attn_pdrop=0, **lm),
        "llama": lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        **lm),
        "opt": lambda: tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=32, word_embed_proj_dim=32, dropout=0,
                                    attention_dropout=0, pad_token_id=1, **lm),
        "gpt-neo": lambda: tf.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=32,
                                           attention_types=[[["global", "local"], 1]], window_size=4,
                                           embed_dropout=0, attention_dropout=0, resid_dropout=0, **lm),
        "gptj": lambda: tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=32, resid_pdrop=0,
                                      embd_pdrop=0, attn_pdrop=0, **lm),
        "bert": lambda: tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=32, num_labels=4, **NO_DROPOUT),
        "electra": lambda: tf.ElectraConfig(vocab_size=V, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                                            num_labels=4, **NO_DROPOUT),
        "vit": lambda: tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=4, **NO_DROPOUT),
        "whisper": lambda: tf.WhisperConfig(vocab_size=V, num_mel_bins=8, d_model=32, encoder_layers=1,
                                            decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                                            encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=8,
                                            max_target_positions=16, dropout=0, attention_dropout=0,
                                            activation_dropout=0, pad_token_id=1, bos_token_id=0, eos_token_id=0,
                                            decoder_start_token_id=0, begin_suppress_tokens=None,
                                            suppress_tokens=None),
    }


HEADS = {"bert": "BertForSequenceClassification", "electra": "ElectraForSequenceClassification",
         "vit": "ViTForImageClassification", "whisper": "WhisperForConditionalGeneration"}
CAUSAL = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "opt": "OPTForCausalLM",
          "gpt-neo": "GPTNeoForCausalLM", "gptj": "GPTJForCausalLM"}


def build(family: str, tiny: bool = True) -> nn.Module:
    """The family's training model (causal LM, sequence or image classifier, speech seq2seq)."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES} or pass --factory")
    model = getattr(tf, {**CAUSAL, **HEADS}[family])(_families(tiny)[family]())
    if family in CAUSAL:
        model.loss_type = "ForCausalLM"  # transformers can't always infer it from the class name
    return model


def make_batch(model: nn.Module, n: int, seq: int = 8, seed: int = 7) -> dict[str, torch.Tensor]:
    """A seeded global batch (the same on every rank) that fits ``model``'s config and head."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "vocab_size") and not hasattr(cfg, "image_size"):
        raise ValueError(f"cannot make a batch for {type(model).__name__}: return (model, global_batch) "
                         "from the --factory function")
    g = torch.Generator().manual_seed(seed)
    if hasattr(cfg, "num_mel_bins"):  # speech encoder-decoder
        frames = 2 * cfg.max_source_positions
        return {"input_features": torch.randn(n, cfg.num_mel_bins, frames, generator=g),
                "labels": torch.randint(2, cfg.vocab_size, (n, seq), generator=g)}
    if hasattr(cfg, "image_size"):
        return {"pixel_values": torch.randn(n, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g),
                "labels": torch.randint(0, cfg.num_labels, (n,), generator=g)}
    ids = torch.randint(2, cfg.vocab_size, (n, seq), generator=g)
    if type(model).__name__.endswith("ForSequenceClassification"):
        return {"input_ids": ids, "labels": torch.randint(0, cfg.num_labels, (n,), generator=g)}
    return {"input_ids": ids, "labels": ids.clone()}


def load_factory(spec: str) -> Callable[[], Any]:
    """``"module:function"`` -> the function. The current directory is importable, as for
    ``python -m``, so a user's ``mymodels.py`` next to them works."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--factory {spec!r}: expected module:function, e.g. mymodels:build")
    if "" not in sys.path:
        sys.path.insert(0, "")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"--factory {spec!r}: {module} has no function {name!r}")
    return fn
