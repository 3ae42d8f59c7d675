"""What hf_zero does with activations: the ``activation_checkpointing`` block (ZeRO-R) and tiled compute.

``ActivationCheckpointingConfig`` is DeepSpeed's ``activation_checkpointing`` block, read key for key;
the Trainer's own ``--gradient_checkpointing`` still decides *whether* layers are checkpointed (as
under DeepSpeed with the Trainer: the block only shapes checkpointing that is on). ``TiledMLPConfig``
and ``TiledLossConfig`` are hf_zero extensions (also read from DeepSpeed files), named after DeepSpeed
ALST's ``TiledMLP`` / ``TiledFusedLogitsLoss`` and their ``shards`` argument. What each does at run
time is in :mod:`hf_zero.activations`; docs/long-sequences.md maps every ZeRO-R technique.
"""

from __future__ import annotations

import dataclasses

from hf_zero.config import checks
from hf_zero.config.auto import Auto
from hf_zero.config.fields import setting


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationCheckpointingConfig:
    """How checkpointed layers keep their inputs (DeepSpeed's ``activation_checkpointing`` block)."""

    partition_activations: bool = setting(
        False,
        deepspeed="partition_activations",
        doc="""Hold each checkpoint partitioned across the ranks that would otherwise each hold all of it.
        In hf_zero that group is the sequence-parallel group: with sequence parallelism every rank's
        checkpoints are already its 1/SP of the sequence. true without sequence parallelism is refused
        (DeepSpeed partitions across its tensor-parallel group; across hf_zero's tensor_parallel group
        it is not built yet). Default
        false (DeepSpeed's).""",
    )
    cpu_checkpointing: bool = setting(
        False,
        deepspeed="cpu_checkpointing",
        doc="""Move each checkpointed layer's saved input to host memory during forward (pinned, copied on a
        side stream on CUDA) and bring it back one layer ahead during backward. Frees layers x sequence x
        hidden bytes of accelerator memory for a device-to-host copy in forward and a host-to-device copy
        in backward, both off the compute stream. Needs the Trainer's --gradient_checkpointing (either
        use_reentrant). Default false (DeepSpeed's): the copies cost step time when memory is not short.""",
    )
    contiguous_memory_optimization: bool = setting(
        False,
        deepspeed="contiguous_memory_optimization",
        doc="""With `cpu_checkpointing`: the host copies go into one pinned arena of `number_checkpoints`
        equal slots, allocated once and reused every step (DeepSpeed's contiguous checkpoint buffers; a
        checkpoint larger than a slot regrows the arena at the start of the next forward). Needs
        `number_checkpoints`, as in DeepSpeed. Without `cpu_checkpointing` checkpoints stay in the
        accelerator's caching allocator and the key is warned about as not applied. Default false
        (DeepSpeed's).""",
    )
    number_checkpoints: int | None = setting(
        None,
        deepspeed="number_checkpoints",
        doc="""With `cpu_checkpointing`: the most checkpoints one forward holds in pinned host memory (the
        bound on pinned bytes: this many buffers of the largest checkpoint); further ones go to pageable
        host memory, copied synchronously, with a warning once. null (default, DeepSpeed's): one pinned
        buffer per checkpoint of a forward, reused by the next forward.""",
    )
    device_checkpoints: int = setting(
        0,
        deepspeed="device_checkpoints",
        doc="""With `cpu_checkpointing`: the first this many checkpoints of each forward stay on the
        accelerator and only the rest go to host memory, for a run whose checkpoints the host cannot
        hold all of while the accelerator can hold some (a 7B Llama at 256K tokens has 32 checkpoints
        of 2 GiB each). The ones kept are never copied; backward uses them last, after the host ones
        came back one layer ahead. hf_zero only (DeepSpeed has no such key). Default 0: every
        checkpoint goes to the host.""",
    )
    synchronize_checkpoint_boundary: bool = setting(
        False,
        deepspeed="synchronize_checkpoint_boundary",
        doc="""DeepSpeed's device synchronize at each checkpoint boundary (a debugging aid). Accepted, not
        applied: hf_zero never synchronizes the device in the step. Default false.""",
    )
    profile: bool = setting(
        False,
        deepspeed="profile",
        doc="""DeepSpeed's timers around checkpoint functions. Accepted, not applied: the torch profiler
        shows hf_zero::checkpoint_offload labels. Default false.""",
    )

    def __post_init__(self) -> None:
        for name in ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization",
                     "synchronize_checkpoint_boundary", "profile"):
            checks.boolean(self, name)
        slots = checks.integer(self, "number_checkpoints", minimum=1, none=True)
        checks.integer(self, "device_checkpoints", minimum=0)
        if self.contiguous_memory_optimization and self.cpu_checkpointing and slots is None:
            raise checks.fail(self, "number_checkpoints", "required with contiguous_memory_optimization (the "
                              "arena's slot count), as in DeepSpeed", value=None, allowed="an integer >= 1")


def _shards(obj: object) -> None:
    checks.integer(obj, "shards", minimum=1, auto=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TiledMLPConfig:
    """Run every decoder MLP in sequence tiles (DeepSpeed ALST's ``TiledMLP``); the block's presence turns it on."""

    shards: int | Auto = setting(
        "auto",
        deepspeed="shards",
        doc="""Tiles the sequence is cut into; each runs under checkpointing, so only one tile's
        intermediate (sequence/shards x intermediate_size) is live, in forward and in backward. "auto"
        (default): ceil(sequence / hidden_size), DeepSpeed ALST's rule (one tile up to hidden_size
        tokens).""",
    )

    def __post_init__(self) -> None:
        _shards(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TiledLossConfig:
    """Compute the causal-LM loss in sequence tiles without full-vocabulary logits (DeepSpeed ALST's
    ``TiledFusedLogitsLoss``); the block's presence turns it on."""

    shards: int | Auto = setting(
        "auto",
        deepspeed="shards",
        doc="""Tiles the hidden states are cut into on their way through the LM head and cross entropy;
        each tile's logits are recomputed in backward, so only one tile's fp32 logits are live. "auto"
        (default): tiles of at most 1 GiB of fp32 logits (ArcticTraining's rule).""",
    )

    def __post_init__(self) -> None:
        _shards(self)


__all__ = ["ActivationCheckpointingConfig", "TiledLossConfig", "TiledMLPConfig"]
