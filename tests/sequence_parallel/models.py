"""The tiny model and batches of the sequence-parallel tests (no download, fp32)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SEQ = 32
VOCAB = 96


def tiny_llama(attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """2 layers, hidden 64, 4 heads, 2 KV heads (grouped-query attention)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * SEQ,
                      tie_word_embeddings=False)
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
