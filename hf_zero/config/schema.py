"""HfZeroConfig, the whole configuration, and the optimizer/scheduler specs it may carry.

All config classes are frozen keyword-only dataclasses validated on construction; every
field is declared with :func:`hf_zero.config.fields.setting` so it carries its own docs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hf_zero.config import checks, optimizer_block, scheduler_block
from hf_zero.config.activations import ActivationCheckpointingConfig, TiledLossConfig, TiledMLPConfig
from hf_zero.config.auto import AUTO, Auto
from hf_zero.config.fields import setting
from hf_zero.config.precision import PrecisionConfig
from hf_zero.config.tensor_parallel import TensorParallelConfig
from hf_zero.config.pipeline import PipelineConfig
from hf_zero.config.zero import OffloadConfig, ZeroConfig
from hf_zero.config.sparse_attention import SparseAttentionConfig

OPTIMIZER_AUTO_KEYS = ("lr", "betas", "eps", "weight_decay")
"""Optimizer params that may be "auto" (filled from TrainingArguments, as HF does)."""

SCHEDULER_AUTO_KEYS = ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps")
"""Scheduler params that may be "auto" (filled from TrainingArguments and num_training_steps)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    """An optimizer named in the config file (DeepSpeed's ``optimizer`` block)."""

    type: str = setting(
        deepspeed="type",
        doc="""Optimizer to build, named as DeepSpeed names it: "AdamW" or "Adam" (torch AdamW;
        Adam's L2 weight decay only for "Adam" with `adam_w_mode` false, as DeepSpeed), "Adagrad",
        or a torch.optim class (SGD, RMSprop, Adamax, NAdam, RAdam, Adadelta, Rprop, ASGD). Types
        with no torch equivalent (Lamb, Lion, OneBitAdam, ZeroOneAdam, OneBitLamb, Mu*, Muon) are
        refused with the alternatives. Required: the block exists to name one; leave the block out
        to use the Trainer's optimizer.""",
    )
    params: dict[str, Any] = setting(
        default_factory=dict,
        deepspeed="params",
        doc="""Keyword arguments for the optimizer. `lr`, `betas`, `eps` and `weight_decay`
        may be "auto" (TrainingArguments.learning_rate, [adam_beta1, adam_beta2],
        adam_epsilon, weight_decay). Adam/AdamW keys left out take DeepSpeed's defaults (lr 1e-3,
        betas [0.9, 0.999], eps 1e-8, weight_decay 0); other types torch's. As under DeepSpeed,
        the optimizer gets every trainable parameter in one group, so `weight_decay` applies to
        biases and norms too. Default: no arguments.""",
    )

    def __post_init__(self) -> None:
        checks.text(self, "type")
        checks.json_params(self, "params", OPTIMIZER_AUTO_KEYS)
        optimizer_block.check(self)  # a type hf_zero builds, its params (optimizer_block.py)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerSpec:
    """A learning-rate scheduler named in the config file (DeepSpeed's ``scheduler`` block)."""

    type: str = setting(
        deepspeed="type",
        doc="""Schedule to run instead of the Trainer's, with DeepSpeed's formulas: "WarmupLR",
        "WarmupDecayLR", "WarmupCosineLR", "OneCycle" or "LRRangeTest"; or, as DeepSpeed takes
        it, the name of a torch.optim.lr_scheduler class ("StepLR", "CosineAnnealingLR", ...,
        built with the params as written). Required; leave the block out to use the Trainer's
        --lr_scheduler_type.""",
    )
    params: dict[str, Any] = setting(
        default_factory=dict,
        deepspeed="params",
        doc="""Keyword arguments for the scheduler. `warmup_min_lr` ("auto": 0),
        `warmup_max_lr` (learning_rate), `warmup_num_steps` and `total_num_steps` (from the
        Trainer's step count) may be "auto". Params left out take DeepSpeed's defaults (WarmupLR:
        warmup_num_steps 1000, warmup_type "log", warmup_max_lr the optimizer's lr). Default: no
        arguments.""",
    )

    def __post_init__(self) -> None:
        checks.text(self, "type")
        checks.json_params(self, "params", SCHEDULER_AUTO_KEYS)
        scheduler_block.check(self)  # DeepSpeed's five schedules or torch's, its params (scheduler_block.py)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HfZeroConfig:
    """Everything hf_zero reads from a ``--zero_config`` file.

    Load with :func:`hf_zero.config.load_config`; fill "auto" with
    :func:`hf_zero.config.resolve_config`.
    """

    zero: ZeroConfig = setting(
        default_factory=ZeroConfig,
        deepspeed="zero_optimization",
        nested=ZeroConfig,
        doc="""ZeRO stage, bucket sizes and offload. Default: stage 0, no offload.""",
    )
    precision: PrecisionConfig = setting(
        default_factory=PrecisionConfig,
        nested=PrecisionConfig,
        doc="""Training dtype and fp16 loss scaling. Default: dtype follows
        TrainingArguments.""",
    )
    gradient_clipping: float | Auto = setting(
        AUTO,
        deepspeed="gradient_clipping",
        doc="""Clip the global gradient norm to this value; 0 disables clipping. "auto" (the
        default, also when a DeepSpeed file omits the key): TrainingArguments.max_grad_norm,
        so the Trainer's flag decides unless the file says otherwise.""",
    )
    train_batch_size: int | Auto | None = setting(
        None,
        deepspeed="train_batch_size",
        doc="""Global batch size: micro batch * gradient accumulation steps * world size.
        null/absent or "auto" (default): computed from TrainingArguments. A number must equal
        that product.""",
    )
    train_micro_batch_size_per_gpu: int | Auto | None = setting(
        None,
        deepspeed="train_micro_batch_size_per_gpu",
        doc="""Samples per rank per forward pass. null/absent or "auto" (default):
        TrainingArguments.per_device_train_batch_size; a number must equal it.""",
    )
    gradient_accumulation_steps: int | Auto | None = setting(
        None,
        deepspeed="gradient_accumulation_steps",
        doc="""Micro batches per optimizer step. null/absent or "auto" (default):
        TrainingArguments.gradient_accumulation_steps; a number must equal it.""",
    )
    optimizer: OptimizerSpec | None = setting(
        None,
        deepspeed="optimizer",
        nested=OptimizerSpec,
        doc="""Optimizer to build. null/absent (default): the Trainer builds its own from
        TrainingArguments.optim.""",
    )
    scheduler: SchedulerSpec | None = setting(
        None,
        deepspeed="scheduler",
        nested=SchedulerSpec,
        doc="""Scheduler to build. null/absent (default): the Trainer builds its own from
        TrainingArguments.lr_scheduler_type.""",
    )
    activation_checkpointing: ActivationCheckpointingConfig = setting(
        default_factory=ActivationCheckpointingConfig,
        deepspeed="activation_checkpointing",
        nested=ActivationCheckpointingConfig,
        doc="""ZeRO-R's activation handling for layers the Trainer checkpoints (--gradient_checkpointing):
        CPU checkpointing, its pinned buffers, partitioning across the sequence-parallel group. Default:
        checkpoints stay on the accelerator.""",
    )
    tiled_mlp: TiledMLPConfig | None = setting(
        None,
        deepspeed="tiled_mlp",
        nested=TiledMLPConfig,
        doc="""hf_zero extension, also read from DeepSpeed files: run each decoder MLP (Llama, Mistral,
        Qwen2, Qwen3) in sequence tiles under checkpointing. null/absent (default): untiled.""",
    )
    tiled_loss: TiledLossConfig | None = setting(
        None,
        deepspeed="tiled_loss",
        nested=TiledLossConfig,
        doc="""hf_zero extension, also read from DeepSpeed files: the training loss of a causal LM (Llama,
        Mistral, Qwen2, Qwen3) in sequence tiles through the LM head and cross entropy, never holding
        full-vocabulary logits. null/absent (default): the model's own loss.""",
    )
    tensor_parallel: TensorParallelConfig = setting(
        default_factory=TensorParallelConfig,
        deepspeed="tensor_parallel",
        nested=TensorParallelConfig,
        doc="""Tensor parallelism beside ZeRO (hf_zero/tensor_parallel, docs/parallelism.md). Default:
        none (autotp_size 1).""",
    )
    pipeline: PipelineConfig = setting(
        default_factory=PipelineConfig,
        deepspeed="pipeline",
        nested=PipelineConfig,
        doc="""Pipeline parallelism beside ZeRO-1/2 (hf_zero/pipeline, docs/parallelism.md). Default:
        none (stages 1).""",
    )
    sequence_parallel_size: int | Auto | None = setting(
        None,
        deepspeed="sequence_parallel_size",
        doc="""Ulysses sequence parallelism (DeepSpeed ALST's key; hf_zero/sequence_parallel,
        docs/long-sequences.md): each sequence is split over this many neighbouring ranks, which
        train on the same batch and trade sequence slices for attention heads around attention.
        Must divide the world size, and the model's attention heads (KV heads: divide it or be a
        multiple of it). null/absent or "auto" (default): the Trainer's
        `parallelism_config.sp_size` when given, else 1 (no sequence parallelism); a number given
        with a `parallelism_config` must equal its sp_size.""",
    )
    sparse_attention: SparseAttentionConfig | None = setting(
        None,
        deepspeed="sparse_attention",
        nested=SparseAttentionConfig,
        doc="""Block-sparse attention (DeepSpeed's block: its modes, keys and layouts), run as FlexAttention
        block masks through transformers' attention interface (hf_zero/sparse_attention,
        docs/long-sequences.md). Opt-in: it changes what the model computes. null/absent (default): the
        model's own attention.""",
    )
    steps_per_print: int = setting(
        10,
        deepspeed="steps_per_print",
        doc="""DeepSpeed's progress-print interval. Accepted for compatibility; the Trainer's
        logging_steps governs logging. Default 10 (DeepSpeed's).""",
    )
    wall_clock_breakdown: bool = setting(
        False,
        deepspeed="wall_clock_breakdown",
        doc="""DeepSpeed's per-phase timing printout. Accepted for compatibility; use the
        torch profiler (hf_zero labels every phase). Default false.""",
    )
    comm_timeout_s: float = setting(
        300.0,
        deepspeed="comm_timeout_s",
        doc="""hf_zero extension, also read from DeepSpeed files: seconds an hf_zero collective
        (a stage-3 unit's gather, a gradient reduce-scatter, ...) may wait before the job is
        stopped. Each rank's watchdog thread then prints one report on every rank naming the
        ranks, the collectives and the stage-3 units where they disagree, and exits with code 3;
        a rank that raises stops the others within about a second the same way. 0 turns the
        watchdog off; otherwise at least 1 (a shorter wait would stop healthy jobs). Default 300: far above any step's wait, well under NCCL's and gloo's own
        timeouts, which stop a hung job after 10-30 minutes without saying which rank went
        astray. Raise it if one rank legitimately works alone for longer between collectives.""",
    )
    checkpoint_digest: str = setting(
        "full",
        deepspeed="checkpoint_digest",
        doc="""hf_zero extension, also read from DeepSpeed files: what each rank records of every
        file of a sharded checkpoint it writes, and what resume, load and consolidate check.
        "full" (default): the sha256 of the whole file, read back after the save: catches any
        changed byte, but costs about as much as writing the file again (+40 % on a CPU save of
        0.34 GB, +15 s on a 16-19 s save of 13.2 GB on an H200: docs/checkpoints.md). "fast":
        the sha256 of the size and the first and last MiB: catches files of another save,
        truncation and damage at either end, not a flip in the middle of a large file, at no
        measurable cost. "off": no manifest (such a checkpoint loads with a warning that it
        cannot be verified). The environment variable HF_ZERO_CHECKPOINT_DIGEST, where set,
        overrides it (also for hf-zero consolidate, which has no config).""",
    )
    source: str | None = setting(
        None,
        compare=False,
        doc="""Where the config came from (file path, "<dict>"), for messages. Not part of
        the configuration: not written by config_to_dict and ignored by ==.""",
    )

    def __post_init__(self) -> None:
        for name, cls in (("zero", ZeroConfig), ("precision", PrecisionConfig),
                          ("activation_checkpointing", ActivationCheckpointingConfig)):
            if not isinstance(getattr(self, name), cls):
                raise checks.fail(self, name, f"not a {cls.__name__}", value=getattr(self, name),
                                  allowed=f"a {cls.__name__}")
        for name, cls in (("optimizer", OptimizerSpec), ("scheduler", SchedulerSpec), ("tiled_mlp", TiledMLPConfig),
                          ("tiled_loss", TiledLossConfig), ("sparse_attention", SparseAttentionConfig)):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), cls):
                raise checks.fail(self, name, f"not a {cls.__name__}", value=getattr(self, name),
                                  allowed=f"a {cls.__name__} or null")
        checks.number(self, "gradient_clipping", minimum=0.0, auto=True)
        for name in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            checks.integer(self, name, minimum=1, auto=True, none=True)
        checks.integer(self, "sequence_parallel_size", minimum=1, auto=True, none=True)
        if not isinstance(self.pipeline, PipelineConfig):
            raise checks.fail(self, "pipeline", "not a PipelineConfig", value=self.pipeline, allowed="a PipelineConfig")
        if not isinstance(self.tensor_parallel, TensorParallelConfig):
            raise checks.fail(self, "tensor_parallel", "not a TensorParallelConfig", value=self.tensor_parallel,
                              allowed="a TensorParallelConfig")
        checks.integer(self, "steps_per_print", minimum=0)
        checks.boolean(self, "wall_clock_breakdown")
        self._check_comm_timeout()
        checks.choice(self, "checkpoint_digest", ("full", "fast", "off"))
        checks.text(self, "source", none=True)

    def _check_comm_timeout(self) -> None:
        """0 or at least a second: below that every healthy collective (a gather of a large unit,
        a reduce-scatter behind a slow rank) would be reported as a hang and the job stopped."""
        value = checks.number(self, "comm_timeout_s")  # a finite number
        if value != 0.0 and value < 1.0:
            raise checks.fail(self, "comm_timeout_s", "out of range", value=value,
                              allowed="0 (no watchdog) or a finite number of seconds >= 1")


__all__ = [
    "AUTO",
    "ActivationCheckpointingConfig",
    "HfZeroConfig",
    "OffloadConfig",
    "OptimizerSpec",
    "PrecisionConfig",
    "SchedulerSpec",
    "ZeroConfig",
]
