"""The model shape `hf-zero estimate` reads from a config.json, checked before transformers sees it.

A negative hidden size, zero heads or a hidden size the heads do not divide would otherwise reach
transformers and torch and come back as a ``RuntimeError``/``ZeroDivisionError`` traceback, or
worse, as a table of nonsense (a negative layer count builds a model with no layers). Each is
refused here with one line naming the key as the file spells it and its value.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hf_zero.config.small_file import read_small_text

# Shape keys, each with the spellings configs use for it (GPT-2's n_embd, T5's d_model, ...).
SIZES = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_key_value_heads": ("num_key_value_heads",),
    "intermediate_size": ("intermediate_size", "n_inner", "d_ff", "ffn_dim"),
    "vocab_size": ("vocab_size",),
    "head_dim": ("head_dim", "d_kv"),
}


def config_file(path: str) -> str:
    """The config.json of ``path`` (the file itself, or the one in a model directory)."""
    if not os.path.exists(path):
        raise ValueError(f"MODEL_CONFIG {path!r} does not exist; give a config.json or a model directory")
    if os.path.isdir(path):
        inner = os.path.join(path, "config.json")
        if not os.path.isfile(inner):
            raise ValueError(f"MODEL_CONFIG {path!r} is a directory without a config.json")
        return inner
    return path


def check_shape(path: str) -> None:
    """ValueError, in one line naming ``path``, for a shape no model can have; else nothing."""
    text = read_small_text(config_file(path), what="MODEL_CONFIG", error=ValueError)
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"MODEL_CONFIG {path!r} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"MODEL_CONFIG {path!r}: the top level must be a JSON object")
    problem = _problem(raw, "") or _problem(raw.get("text_config"), "text_config.")
    if problem is not None:
        raise ValueError(f"MODEL_CONFIG {path!r}: {problem}")


def _problem(block: Any, prefix: str) -> str | None:
    if not isinstance(block, dict):
        return None
    found: dict[str, tuple[str, int]] = {}  # canonical name -> (the file's key, value)
    for name, spellings in SIZES.items():
        for key in spellings:
            value = block.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                return f"{prefix}{key} = {json.dumps(value)}: must be a positive integer"
            found.setdefault(name, (key, value))
    hidden, heads, kv = (found.get(n) for n in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if hidden and heads and "head_dim" not in found and hidden[1] % heads[1]:
        return (f"{prefix}{hidden[0]} = {hidden[1]} is not divisible by {prefix}{heads[0]} = {heads[1]} "
                "(each head gets hidden_size / num_attention_heads dimensions)")
    if heads and kv and heads[1] % kv[1]:
        return (f"{prefix}{heads[0]} = {heads[1]} is not divisible by {prefix}{kv[0]} = {kv[1]} "
                "(each key/value head serves the same number of query heads)")
    return None
