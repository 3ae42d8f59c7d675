"""What one rank holds of a model when a parallel axis splits it: the estimator's per-rank shares.

[Note: per-rank shares]
``hf-zero estimate`` and ``hf-zero doctor`` size one rank in two moves:

1. the axes that split the model itself decide which elements one rank's model holds. Tensor
   parallelism (``tensor_parallel.autotp_size`` = tp) keeps 1/tp of each planned Linear's weight (a
   colwise layer's rows and bias, a rowwise layer's columns: ``hf_zero/tensor_parallel/plan.py``) and
   every other param whole (norms, embeddings, the LM head, rowwise biases);
2. ZeRO shards what that rank's model holds over the data-parallel ranks, dp = W / tp, exactly as it
   shards a whole model over W ranks: ``estimate_bytes(rank_counts, world=dp)``.

``rank_units`` is the one function doing both (``ParamCounts.per_rank`` in estimate.py applies it). The
pipeline axis (``pipeline.stages`` = pp) slots in beside tp: step 1 then also keeps only what the rank's
pipeline stage holds ([Note: pipeline stage shares] in estimate_pipeline.py), and dp = W / (tp * pp).

Worked example, the tiny Llama of ``tests/tensor_parallel/models.py`` (hidden 64, intermediate 128,
4 heads of 16, 2 KV heads, 2 layers, vocabulary 128, untied), tp 2:

| params | whole model | one tp rank |
|---|---:|---:|
| per block: q, o (64 x 64), k, v (32 x 64), gate, up, down (128 x 64): split | 36,864 | 18,432 |
| per block: 2 RMSNorm weights (64): whole | 128 | 128 |
| root: embeddings and LM head (128 x 64), final norm (64): whole | 16,448 | 16,448 |
| model (2 blocks + root) | 90,432 | 53,568 |

At W = 4 (dp 2), stage 2, fp32, each rank holds 53,568 x 4 = 214,272 bytes of params and half of
them as its fp32 grad shard (107,136 bytes): the figures the run report of that job measures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from hf_zero.config.checks import world_axis
from hf_zero.estimate_pipeline import PP_KEY, PpSplit, stage_units

Units = tuple[tuple[int, ...], ...]
"""Element counts per stage-3 unit and param, as ``ParamCounts.units``."""
TP_KEY = "tensor_parallel.autotp_size"


@dataclasses.dataclass(frozen=True)
class TpSplit:
    """What a model's tensor-parallel plan splits, counted once on the meta device (``tp_split``)."""

    sizes: Units
    """As ``ParamCounts.units``, per unit and param: the size of the dim tp splits (a colwise layer's
    out_features, a rowwise one's in_features); 0 for a param every tp rank holds whole."""
    widths: tuple[tuple[str, int], ...] = ()
    """(split layer, that size): tp must divide each."""
    heads: tuple[tuple[str, int], ...] = ()
    """The attention head counts tp must divide (each rank holds whole heads)."""
    refusal: str | None = None
    """Why tp cannot split this model (no plan, a style not built); said only when tp > 1."""


@dataclasses.dataclass(frozen=True)
class Axes:
    """How W ranks are split: tp ranks split each planned layer, pp pipeline stages hold a run of layers
    each, the W / (tp * pp) others are data parallel."""

    world: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.world, bool) or not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"world must be a positive integer, got {self.world!r}")
        world_axis(self.tp, self.world, key=TP_KEY, off="no tensor parallelism",
                   layout="(dp, tp) = (world size / tp, tp)")
        world_axis(self.pp, self.world // self.tp, key=PP_KEY, off="no pipeline",
                   layout="(pp, dp, tp) = (stages, world size / (stages * tp), tp)")

    @property
    def dp(self) -> int:
        """The ranks ZeRO shards over: those holding the same tp part of the same stage."""
        return self.world // (self.tp * self.pp)


def tp_split(model: nn.Module, unit_names: Sequence[Sequence[str]]) -> TpSplit:
    """What the model's plan (its ``tp_plan``, or hf_zero's decoder-block plan) splits, per param of
    ``unit_names`` (the names of each unit's trainable params, in ``ParamCounts.units`` order)."""
    from hf_zero.tensor_parallel.plan import model_plan, resolve

    whole = tuple((0,) * len(names) for names in unit_names)
    try:
        layers = resolve(model, model_plan(model))
    except Exception as error:  # noqa: BLE001 - any model the plan cannot read: said only when tp > 1
        return TpSplit(sizes=whole, refusal=str(error))
    dims: dict[str, int] = {}
    widths = []
    for layer in layers:
        weight = model.get_submodule(layer.name).weight
        size = weight.shape[0 if layer.style == "colwise" else 1]
        widths.append((layer.name, size))
        dims[f"{layer.name}.weight"] = size
        bias = model.get_submodule(layer.name).bias
        if layer.style == "colwise" and bias is not None:
            dims[f"{layer.name}.bias"] = size
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = tuple((key, value) for key in ("num_attention_heads", "num_key_value_heads")
                  if isinstance(value := getattr(text, key, None), int) and not isinstance(value, bool))
    return TpSplit(sizes=tuple(tuple(dims.get(n, 0) for n in names) for names in unit_names),
                   widths=tuple(widths), heads=heads)


def rank_units(units: Units, split: TpSplit | None, axes: Axes, pipeline: PpSplit | None = None,
               stage: int = 0) -> tuple[Units, int]:
    """(what one rank of pipeline ``stage`` holds of ``units``, the ranks ZeRO shards it over): [Note:
    per-rank shares].

    ValueError when tp or pp cannot split this model: no plan, a head count or layer width tp does not
    divide, a model the pipeline cannot cut (what the Trainer refuses at the split, said before any run)."""
    if not 0 <= stage < axes.pp:
        raise ValueError(f"pipeline stage {stage} of {axes.pp}: allowed 0 to {axes.pp - 1}")
    return stage_units(_tp_units(units, split, axes), pipeline, axes.pp, stage), axes.dp


def _tp_units(units: Units, split: TpSplit | None, axes: Axes) -> Units:
    tp = axes.tp
    if tp == 1:
        return units
    if split is None:
        raise ValueError(f"{TP_KEY} = {tp}: these counts carry no tensor-parallel plan; count the model "
                         "with hf_zero.estimate.count_params")
    if split.refusal is not None:
        raise ValueError(split.refusal)
    for key, heads in split.heads:
        if heads % tp:
            raise ValueError(f"{TP_KEY} = {tp}: the model's {key} = {heads} is not divisible by {tp}; each tp "
                             f"rank must hold whole heads (allowed: a divisor of {heads} that divides the world size)")
    for name, size in split.widths:
        if size % tp:
            raise ValueError(f"{TP_KEY} = {tp}: {name} splits {size} features, not divisible by {tp}")
    return tuple(tuple(n // tp if size else n for n, size in zip(unit, sizes)) for unit, sizes in zip(units, split.sizes))
