"""The decision table of docs/choosing-a-stage.md, computed by ``hf-zero estimate``'s own functions.

For a few Llama-shaped models (built on the meta device from their shapes: nothing downloaded) and
GPU sizes, the first setup in :data:`SETUPS` whose per-rank bytes fit. The order is fastest first,
as in DeepSpeed's and transformers' advice: less sharding means fewer collectives, and offload moves
the optimizer step to the host. Per rank counted: the estimator's "states peak" (params, gathered
units at stage 3, peak gradients, optimizer state with fp32 masters) plus its activation estimate,
against :data:`USABLE` of the GPU's memory (the rest is the CUDA context, the allocator's slack and
what the estimate leaves out).

Regenerate after changing the estimator::

    python -m hf_zero.stage_choice

prints the table; ``tests/test_stage_choice.py`` fails when docs/choosing-a-stage.md holds another.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

from hf_zero.byte_units import fmt_bytes
from hf_zero.estimate import activation_bytes, activation_shape, count_params, estimate_bytes, \
    gathered_params_bytes, meta_model

GiB = 2**30
USABLE = 0.85
"""Share of a GPU's memory the states and activations may take."""
WORLD = 8
"""Ranks (one node of 8 GPUs)."""
GPUS_GIB = (24, 40, 80)
MICRO_BATCH, SEQ_LEN = 1, 2048  # with gradient checkpointing, --bf16, AdamW, the model loaded in fp32 (stage 0 then
# trains fp32 params under autocast, as the Trainer does; stages 1-3 keep bf16 params and fp32 master shards)


class Setup(NamedTuple):
    label: str
    stage: int
    offload: bool


SETUPS = (
    Setup("stage 0", 0, False),
    Setup("stage 1", 1, False),
    Setup("stage 2", 2, False),
    Setup("stage 2 + CPU optimizer offload", 2, True),
    Setup("stage 3", 3, False),
    Setup("stage 3 + CPU optimizer offload", 3, True),
)
"""Fastest first."""

MODELS = {  # Llama-shaped configs of public model sizes (shapes only)
    "1.1B (TinyLlama)": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=32000),
    "8B (Llama-3-8B)": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256),
    "13B (Llama-2-13B)": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                              num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "70B (Llama-3-70B)": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
}


def per_rank_bytes(counts, act: int, setup: Setup) -> tuple[int, int]:
    """(GPU bytes per rank, host bytes per rank) of ``setup``, as ``hf-zero estimate`` counts them."""
    b = estimate_bytes(counts, stage=setup.stage, world=WORLD, dtype="bf16", optimizer="adamw", model_dtype="fp32",
                       offload_optimizer=setup.offload)
    gathered = gathered_params_bytes(counts, world=WORLD, dtype="bf16") if setup.stage == 3 else 0
    return b["params"] + gathered + b["peak_grads"] + b["optimizer_state"] + act, b["host_offload"]


def choose(counts, act: int, gpu_bytes: int) -> tuple[Setup, int, int] | None:
    """The first setup that fits ``gpu_bytes``, with its GPU and host bytes per rank; None if none does."""
    for setup in SETUPS:
        gpu, host = per_rank_bytes(counts, act, setup)
        if gpu <= USABLE * gpu_bytes:
            return setup, gpu, host
    return None


def render_markdown() -> str:
    from transformers import LlamaConfig

    head = "| model | params | " + " | ".join(f"{g} GiB GPUs" for g in GPUS_GIB) + " |"
    out = [head, "|---|---|" + "---|" * len(GPUS_GIB)]
    for name, shape in MODELS.items():
        cfg = LlamaConfig(**shape, tie_word_embeddings=False)
        counts = count_params(meta_model(cfg))
        act = activation_bytes(activation_shape(cfg), micro_batch=MICRO_BATCH, seq_len=SEQ_LEN, dtype="bf16",
                               gradient_checkpointing=True)
        cells = []
        for gib in GPUS_GIB:
            chosen = choose(counts, act, gib * GiB)
            if chosen is None:
                cells.append(f"does not fit {WORLD} ranks: more ranks, or parameter offload")
                continue
            setup, gpu, host = chosen
            cells.append(f"{setup.label} ({fmt_bytes(gpu)}" + (f"; host {fmt_bytes(host)}" if host else "") + ")")
        out.append(f"| {name} | {counts.total / 1e9:.2f} B | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
