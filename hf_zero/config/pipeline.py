"""The ``pipeline`` block: how many pipeline stages split the model's decoder layers (hf_zero/pipeline).

DeepSpeed's ``pipeline`` JSON block holds only ``stages`` of these three (and keys of its own
``PipelineModule``: ``partition``, ``seed_layers``, ... listed in not_applied.py); its schedule and
micro-batch count live in ``PipelineModule``/``PipelineEngine`` code (1F1B, micro-batches = gradient
accumulation steps), which hf_zero's defaults match.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hf_zero.config import checks
from hf_zero.config.auto import AUTO, is_auto
from hf_zero.config.fields import setting

SCHEDULES = ("1F1B", "interleaved_1F1B", "GPipe")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Pipeline parallelism beside ZeRO-1/2 (torch.distributed.pipelining)."""

    stages: int = setting(
        1,
        deepspeed="stages",
        doc="""Pipeline stages: the model's decoder layers are split at layer boundaries over this many
        ranks (as evenly as possible, earlier stages taking one more where they do not divide); stage 0
        holds the embeddings, the last stage the final norm, the LM head and the loss. The ranks form a
        (stages, world size / stages) mesh, pipeline-outer (ranks 0 .. dp-1 are stage 0); ZeRO stages
        0-2 shard over the dp ranks of each stage, and every rank of a pipeline trains on the same
        batch. Must divide the world size and be at most the decoder layer count. "auto" (DeepSpeed's
        default, where its PipelineModule decides) means 1 here. Default 1: no pipeline.""",
    )
    schedule: str = setting(
        "1F1B",
        deepspeed="schedule",
        doc="""hf_zero extension, also read from DeepSpeed files: torch.distributed.pipelining's schedule. "1F1B" (default, DeepSpeed's
        PipelineEngine's): one forward, one backward in steady state, at most `stages` micro-batches'
        activations alive on stage 0; "interleaved_1F1B": two virtual stages per rank (layers split
        into 2 x stages pieces, rank r holding pieces r and r + stages), a smaller bubble for more
        point-to-point traffic, needs micro-batches a multiple of stages and layers >= 2 x stages;
        "GPipe": every forward, then every backward (all micro-batches' activations alive at once).""",
    )
    micro_batches: int | Any = setting(
        AUTO,
        deepspeed="micro_batches",
        doc="""hf_zero extension, also read from DeepSpeed files: micro-batches per pipeline step. "auto" (default, as DeepSpeed's
        PipelineEngine): the Trainer's gradient_accumulation_steps; the pipeline consumes the
        accumulation, each of its batches one micro-batch, one schedule step per optimizer step.
        An integer: each of the Trainer's batches is split into this many micro-batches (it must
        divide per_device_train_batch_size), one schedule step per batch.""",
    )

    def __post_init__(self) -> None:
        if is_auto(self.stages):
            object.__setattr__(self, "stages", 1)  # DeepSpeed's default: its PipelineModule decides
        checks.integer(self, "stages", minimum=1)
        checks.choice(self, "schedule", SCHEDULES)
        checks.integer(self, "micro_batches", minimum=1, auto=True)

    @property
    def enabled(self) -> bool:
        return self.stages > 1
