"""Which Linear layers are split, and how: the model's own tensor-parallel plan, in transformers' words.

A plan maps module names (``*`` for a layer number) to a style, as transformers' ``tp_plan`` does::

    {"model.layers.*.self_attn.q_proj": "colwise", ..., "model.layers.*.self_attn.o_proj": "rowwise"}

The plan comes from ``model.tp_plan`` (the model class's ``_tp_plan`` plus its config's
``base_model_tp_plan``, as transformers merges them); a model without one gets the plan of a common
decoder block (:data:`DECODER_PLAN`) when its module names fit it. Styles:

| style | what hf_zero does |
|---|---|
| ``colwise`` | split ``out_features`` (weight rows, bias); the input enters through f ([Note: f and g] in split.py) |
| ``rowwise`` | split ``in_features`` (weight columns; the bias stays whole); the output leaves through g |
| ``embedding_rowwise``, ``colwise_gather_output``, ``replicate`` | kept whole on every rank (the vocabulary split of embeddings and LM heads is not built yet); correct, not smaller |
| anything else (``packed_colwise``, ``moe_tp_experts``, ``sequence_parallel``, ...) | refused, naming the module and the style |
"""

from __future__ import annotations

import re
from typing import NamedTuple

from torch import nn

SPLIT_STYLES = ("colwise", "rowwise")
KEPT_WHOLE = ("embedding_rowwise", "colwise_gather_output", "replicate")

# The Llama/Mistral/Qwen2 block, for a model that carries no plan of its own.
DECODER_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}


class PlannedLayer(NamedTuple):
    name: str  # the module's name in the model
    style: str  # "colwise" or "rowwise"


def model_plan(model: nn.Module) -> dict[str, str]:
    """The model's own plan, else the decoder-block plan if it matches a Linear, else a clear error."""
    own = dict(getattr(model, "tp_plan", None) or {})
    if own:
        return own
    # The decoder block's patterns under whatever prefix holds the layers ("model." for a *ForCausalLM).
    first = re.compile(r"(.*\.)?" + _pattern(next(iter(DECODER_PLAN))).pattern)
    for name, module in model.named_modules():
        found = first.fullmatch(name)
        if found and isinstance(module, nn.Linear):
            return {(found.group(1) or "") + p: s for p, s in DECODER_PLAN.items()}
    raise ValueError(
        f"tensor_parallel.autotp_size > 1: {type(model).__name__} has no tp_plan (transformers' "
        "base_model_tp_plan) and no decoder block hf_zero knows (self_attn.q_proj/k_proj/v_proj/o_proj, "
        "mlp.gate_proj/up_proj/down_proj under layers.N); set model.tp_plan = {module pattern: style}")


def resolve(model: nn.Module, plan: dict[str, str]) -> list[PlannedLayer]:
    """Every module the plan splits, in model order; refuses styles hf_zero does not build."""
    for pattern, style in plan.items():
        if style not in SPLIT_STYLES + KEPT_WHOLE:
            raise ValueError(
                f"tp_plan[{pattern!r}] = {style!r}: hf_zero builds {', '.join(SPLIT_STYLES)} and keeps "
                f"{', '.join(KEPT_WHOLE)} whole; this style is not built yet")
    split = [(_pattern(p), s) for p, s in plan.items() if s in SPLIT_STYLES]
    out = []
    for name, module in model.named_modules():
        styles = {s for rx, s in split if rx.fullmatch(name)}
        if not styles:
            continue
        if len(styles) > 1:
            raise ValueError(f"tp_plan gives module {name!r} two styles: {sorted(styles)}")
        if type(module) is not nn.Linear:
            raise ValueError(f"tp_plan[{name!r}] = {styles.pop()!r}: hf_zero splits torch.nn.Linear layers only; "
                             f"this module is a {type(module).__name__}")
        out.append(PlannedLayer(name, styles.pop()))
    if not out:
        raise ValueError(f"the tp_plan matches no Linear layer of {type(model).__name__}: {plan}")
    return out


def _pattern(key: str) -> re.Pattern:
    """``layers.*.q_proj`` -> a regex where ``*`` is one name part (a layer number), as transformers reads it."""
    return re.compile(r"[^.]+".join(re.escape(part) for part in key.split("*")))
