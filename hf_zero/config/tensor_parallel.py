"""DeepSpeed's ``tensor_parallel`` block: how many ranks split each planned layer (hf_zero/tensor_parallel)."""

from __future__ import annotations

import dataclasses

from hf_zero.config import checks
from hf_zero.config.fields import setting


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorParallelConfig:
    """Tensor parallelism beside ZeRO (DeepSpeed AutoTP training's ``tensor_parallel`` block)."""

    autotp_size: int = setting(
        1,
        deepspeed="autotp_size",
        doc="""Ranks that split each Linear layer of the model's tensor-parallel plan (its own
        `tp_plan`, or the plan of a Llama-style decoder block): colwise layers keep 1/tp of their
        output features, rowwise ones 1/tp of their input features, attention keeps heads/tp heads.
        The ranks form a (world size / tp, tp) mesh, tp-inner (neighbouring ranks split a layer);
        ZeRO shards over the world size / tp ranks of one tp rank, and every rank of a tp group trains
        on the same batch. Must divide the world size and the model's attention and KV head counts
        (checked when the Trainer is created). Not built yet with it, refused before any rank
        starts: optimizer or parameter offload, and a sharded load (at stage 3 write
        `zero3_init_flag: false`, whose unset default there is true). Default 1 (DeepSpeed's): no
        tensor parallelism.""",
    )

    def __post_init__(self) -> None:
        checks.integer(self, "autotp_size", minimum=1)
