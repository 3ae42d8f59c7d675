"""The stage behaviour of an engine, picked from the stage table (stages.py)."""

from __future__ import annotations

from hf_zero.engine.flat_strategy import FlatStrategy
from hf_zero.engine.stages import StageBehaviour, strategy_for
from hf_zero.engine.stage3.unit_strategy import UnitStrategy


def make_strategy(stage: int, *, model, ctx, streams, bucket_numel: int, param_dtype=None, persistence_threshold=0,
                  prefetch_numel=0, max_live_numel=None, offload_param=None, source=None) -> StageBehaviour:
    """``FlatStrategy`` for stages 1-2, ``UnitStrategy`` for stage 3 (a clear error for others)."""
    knobs = strategy_for(stage)
    if knobs.shard_params:
        return UnitStrategy(knobs, model=model, ctx=ctx, streams=streams, param_dtype=param_dtype,
                            persistence_threshold=persistence_threshold, prefetch_numel=prefetch_numel,
                            max_live_numel=max_live_numel, offload_param=offload_param, source=source)
    return FlatStrategy(knobs, ctx=ctx, bucket_numel=bucket_numel, param_dtype=param_dtype,
                        offload_param=offload_param, source=source)
