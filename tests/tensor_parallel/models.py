"""The tiny Llama of the tensor-parallel tests (2 layers, hidden 64, 4 heads, 2 KV heads) and its batches."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

VOCAB = 128


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    tie_word_embeddings=False)
    cfg = LlamaConfig(**{**settings, **overrides})
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()


def batch(step: int, bsz: int = 2, seq: int = 12) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (bsz, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}
