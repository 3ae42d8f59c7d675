"""The tiny models and batches of the sequence-parallel tests (no download, fp32).

``tiny_model(family)``: the same shape (2 layers, hidden 64, 4 heads of 16, 2 KV heads) for each family
issue 19 names: ``llama``; ``qwen2`` (biased q/k/v projections); ``qwen3`` (q/k RMSNorm per head, its
second layer a sliding-window layer: ``layer_types`` mixed); ``mistral`` (every layer sliding-window).
The windows (``WINDOW`` tokens) are shorter than both the sequence and a rank's slice of it at P = 2,
so a Ulysses run that ignored them would attend to tokens the unsplit model does not."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

SEQ = 32
VOCAB = 96
WINDOW = 6  # sliding window (qwen3's second layer, mistral's layers): < SEQ / 2

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_llama(attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """2 layers, hidden 64, 4 heads, 2 KV heads (grouped-query attention)."""
    return tiny_model("llama", attn, seed)


def tiny_model(family: str = "llama", attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """``family``'s tiny model (module docstring): 2 layers, hidden 64, 4 heads, 2 KV heads."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * SEQ,
                 tie_word_embeddings=False)
    if family == "llama":
        cfg = LlamaConfig(**shape)
    elif family == "qwen2":
        cfg = Qwen2Config(**shape)
    elif family == "qwen3":
        cfg = Qwen3Config(**shape, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
        assert cfg.layer_types == ["full_attention", "sliding_attention"], cfg.layer_types
    elif family == "mistral":
        cfg = MistralConfig(**shape, sliding_window=WINDOW)
    else:
        raise ValueError(f"no tiny model for {family!r}; one of {FAMILIES}")
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).float()


def lm_batch(group: int, step: int, rows: int = 2) -> dict:
    """A batch of ``rows`` sequences of SEQ tokens; some labels are -100 (a prompt, right padding) so
    the slices of one sequence hold different numbers of real tokens."""
    g = torch.Generator().manual_seed(1000 * step + group)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt
    labels[-1, SEQ - 11:] = -100  # right padding
    mask = torch.ones_like(ids)
    mask[-1, SEQ - 11:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
