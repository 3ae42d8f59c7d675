"""The pipeline axis of ``hf-zero estimate`` and ``hf-zero doctor``: what one stage's ranks hold, and
the activations in flight there.

[Note: pipeline stage shares]
``pipeline.stages`` = pp cuts a Llama-like decoder's L layers into pp runs, as evenly as possible with
earlier runs one longer; stage 0 also holds the embeddings, the last stage the final norm and the LM
head (hf_zero/pipeline/split.py). So one rank's model is its stage's params (after tp's split:
[Note: per-rank shares] in estimate_parallel.py), and ZeRO shards them over dp = W / (tp * pp).
Stages differ, so the estimate sizes every stage and reports the heaviest one (the largest states +
activations).

Activations: a micro-batch that a stage has run forward but not yet backward keeps its activations.
Under 1F1B stage s (0-based) holds at most min(pp - s, M) of M micro-batches: pp - s - 1 warm-up
forwards, then one forward per backward; stage 0 holds pp of them, the last stage one. GPipe runs
every forward first: M on each stage. One micro-batch keeps the stage's layers' activations (the
decoder formula of ``estimate.activation_bytes``: s*b*h*(10 + 24/tp) 16-bit bytes a layer; with
gradient checkpointing each layer's input, s*b*h*p, and one layer rebuilt at a time, counted once),
and on the last stage its logits, s*b*V*(p + 4) (``estimate.stage_activation_bytes``). Interleaved
1F1B (two pieces a rank) is not modelled yet. Frozen params are counted whole on every stage.

Worked example, the tiny Llama of ``tests/tensor_parallel/models.py`` at pp 2 (2 layers: one a
stage), fp32: stage 0 holds layer 0 and the embeddings (36,992 + 8,192 = 45,184 params), stage 1
layer 1, the final norm and the LM head (36,992 + 64 + 8,192 = 45,248): stage 1 is the heavier in
params; at seq 12, micro batch 2, 1F1B keeps 2 micro-batches of layer 0 on stage 0 (2 x 34 x 12 x 2 x
64 x 4 / 2 = 208,896 bytes) and 1 of layer 1 plus its logits on stage 1 (104,448 + 24,576 = 129,024),
so stage 0 is the heaviest once activations count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

PP_KEY = "pipeline.stages"
FIRST, LAST = -1, -2  # a root param's place: the first stage (embeddings) or the last (norm, LM head, the rest)
SCHEDULES = ("1F1B", "GPipe")  # the schedules whose activations are modelled


@dataclasses.dataclass(frozen=True)
class PpSplit:
    """Where a pipeline split puts each param, counted once on the meta device (``pp_split``)."""

    places: tuple[tuple[int, ...], ...]
    """As ``ParamCounts.units``, per unit and param: the decoder layer holding it (>= 0), FIRST or LAST."""
    layers: int = 0
    refusal: str | None = None
    """Why hf_zero cannot split this model (pipeline/split.py's reason); said only when pp > 1."""


def pp_split(model: nn.Module, unit_names: Sequence[Sequence[str]]) -> PpSplit:
    """Each param's place under a pipeline split (``unit_names``: each unit's trainable param names)."""
    from hf_zero.pipeline.split import NotSplittable, find_decoder

    try:
        decoder = find_decoder(model, 2)
    except NotSplittable as error:
        reason = str(error).split(": ", 1)[-1]  # without its "pipeline.stages = 2: " (pp is said at refusal)
        return PpSplit(places=tuple((LAST,) * len(names) for names in unit_names), refusal=reason)
    prefix = getattr(model, "base_model_prefix", "model")

    def place(name: str) -> int:
        if name.startswith(f"{prefix}.layers."):
            return int(name[len(prefix) + len(".layers."):].split(".", 1)[0])
        return FIRST if name.startswith(f"{prefix}.embed_tokens.") else LAST

    return PpSplit(places=tuple(tuple(place(n) for n in names) for names in unit_names), layers=decoder.num_layers)


def layer_counts(split: PpSplit, pp: int) -> list[int]:
    """Decoder layers on each stage; ValueError where the model cannot be split so."""
    from hf_zero.pipeline.split import layer_ranges

    if split.refusal is not None:
        raise ValueError(f"{PP_KEY} = {pp}: {split.refusal}")
    return [len(r) for r in layer_ranges(split.layers, pp)]


def stage_units(units: tuple[tuple[int, ...], ...], split: PpSplit | None, pp: int,
                stage: int) -> tuple[tuple[int, ...], ...]:
    """``units`` (per unit and param, element counts) keeping only what pipeline ``stage`` of ``pp``
    holds; a unit it holds nothing of stays, empty."""
    if pp == 1:
        return units
    if split is None:
        raise ValueError(f"{PP_KEY} = {pp}: these counts carry no pipeline split; count the model with "
                         "hf_zero.estimate.count_params")
    from hf_zero.pipeline.split import layer_ranges

    layer_counts(split, pp)  # the refusals first
    keep = set(layer_ranges(split.layers, pp)[stage])
    ends = {FIRST} if stage == 0 else set()
    ends |= {LAST} if stage == pp - 1 else set()
    return tuple(tuple(n for n, where in zip(unit, places) if where in keep or where in ends)
                 for unit, places in zip(units, split.places))


def in_flight(stage: int, pp: int, schedule: str, micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once (see the Note)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline.schedule {schedule!r}: activations are modelled for {', '.join(SCHEDULES)}; "
                         "interleaved_1F1B is not modelled yet")
    return micro_batches if schedule == "GPipe" else min(pp - stage, micro_batches)
