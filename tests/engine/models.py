"""Tiny models for engine tests, built from configs (no download)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig


def tiny_llama(seed: int = 0, *, tied: bool = True, odd: bool = True, layers: int = 2) -> nn.Module:
    """A 2-layer Llama; ``odd`` picks sizes that do not divide by 2 or 4."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=101 if odd else 128,
        hidden_size=36 if odd else 32,
        intermediate_size=50 if odd else 64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=10 if odd else 8,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()


def add_frozen_and_unused(model: nn.Module) -> nn.Module:
    """Freeze one weight and add a trainable parameter that forward never uses."""
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    model.register_parameter("unused_bias", nn.Parameter(torch.randn(13)))
    return model


def batch(rank: int, step: int, micro: int, vocab: int, bsz: int = 2, seq: int = 12) -> dict:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    ids = torch.randint(0, vocab, (bsz, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def slow_host_step(seconds: float = 0.02) -> None:
    """Make every chunk of the host step (offload/host_step.py) take ``seconds`` longer, in this
    process (a rank): backward and the next forward then run ahead of the worker."""
    import time

    from hf_zero.engine.offload import host_step as H

    step_chunk = H.HostStep._step_chunk

    def slowed(self, *args):
        time.sleep(seconds)
        step_chunk(self, *args)

    H.HostStep._step_chunk = slowed
