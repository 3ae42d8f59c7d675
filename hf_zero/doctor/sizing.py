"""Bytes a run needs, per rank, built from the memory estimator (``hf_zero.estimate``).

Nothing here re-derives the estimator's arithmetic: device bytes are its ``estimate_bytes`` +
``gathered_params_bytes`` + ``activation_bytes`` (the "total" column of ``hf-zero estimate``).
On top of that, what the doctor needs and the estimator has no column for:

* offloaded bytes: with ``offload_optimizer.device`` "cpu"/"nvme", the estimator's ``host_offload``
  (fp32 master shard, optimizer state, host copy of the fp32 gradient shard), times ``ratio`` (ratio
  "auto" with "cpu": the first step's, as the engine starts it on the host, ``first_step``); "nvme"
  keeps the gradient copy on the host (the NVMe tier's chunk buffers are not counted); the state at
  2 bytes per value with ``offload_optimizer.state_dtype`` "bf16", in host memory or the swap files; with
  ``offload_param`` (stage 3) the rank's param shards, frozen ones included. Pinned (cpu,
  ``pin_memory`` true, CUDA present):
  the master and gradient shards of optimizer offload (``engine/offload/settings.py``), the param shard of
  param offload; the optimizer's own state tensors are ordinary host memory.
* the host copy every rank loads before it shards (``from_pretrained`` on the CPU, the model's
  dtype), which is what host RAM must hold per rank on a GPU machine.

With ``tensor_parallel.autotp_size`` (``RunSpec.tp``) a rank's model holds the planned layers / tp and
ZeRO shards it over W / tp ranks ([Note: per-rank shares] in ``hf_zero/estimate_parallel.py``). With
``pipeline.stages`` (``RunSpec.pp``) a rank holds its stage's layers, ZeRO shards them over W / (tp * pp)
ranks, and the activations are those of the micro-batches in flight on the stage; the heaviest stage
is what a rank needs ([Note: pipeline stage shares] in ``hf_zero/estimate_pipeline.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from hf_zero.estimate import (
    DEFAULT_BUCKET,
    DTYPE_BYTES,
    ActivationShape,
    ParamCounts,
    activation_bytes,
    activation_shape,
    count_params,
    estimate_bytes,
    gathered_params_bytes,
    load_model_config,
    meta_model,
    stage_activation_bytes,
)
from hf_zero.estimate_auto import AutoStart, auto_start
from hf_zero.estimate_parallel import Axes
from hf_zero.estimate_pipeline import SCHEDULES, layer_counts

if TYPE_CHECKING:
    from hf_zero.engine.offload.host_room import HostReading

_TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class ModelInfo:
    """A model as the estimator counts it, built on the meta device from its config."""

    path: str
    model_type: str
    counts: ParamCounts
    shape: ActivationShape | None
    dtype: str = "fp32"
    """Dtype ``from_pretrained`` loads it in: the config's ``dtype`` (transformers 5 loads "auto")."""

    def describe(self) -> str:
        return (f"{self.path} ({self.model_type}): {self.counts.total:,} params, trainable "
                f"{self.counts.trainable:,}, loads in {self.dtype}")


def load_model_info(path: str) -> ModelInfo:
    """Count the model at ``path`` (a config.json or a model dir); ValueError naming the path."""
    cfg = load_model_config(path)
    counts = count_params(meta_model(cfg))
    raw = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    dtype = _TORCH_DTYPES.get(str(raw).replace("torch.", ""), "fp32")
    return ModelInfo(path=path, model_type=cfg.model_type, counts=counts, shape=activation_shape(cfg), dtype=dtype)


@dataclass(frozen=True)
class RunSpec:
    """What the config (and the doctor's flags) say about the run, in the estimator's terms."""

    stage: int = 0
    dtype: str | None = None
    """fp32/bf16/fp16; None for "auto" (sized as the larger of bf16 and fp32)."""
    optimizer: str = "adamw"
    reduce_bucket_size: int | str = DEFAULT_BUCKET
    micro_batch: int = 1
    seq_len: int | None = None
    """None: activations are not counted."""
    gradient_checkpointing: bool = False
    offload_optimizer: str = "none"
    offload_ratio: float = 1.0
    offload_auto: bool = False
    """offload_optimizer.ratio "auto": the first step is sized (device "cpu": as the engine starts it on
    ``host``, ``first_step``; else at 1.0), the choice after it said beside it."""
    offload_host_share: float = 0.0
    """offload_optimizer.host_share (device "nvme"): that share of the swapped masters and state in host
    memory ([Note: host share]); "auto" is sized at 0 (all on NVMe: the disk's bound)."""
    offload_state_dtype: str = "fp32"
    """offload_optimizer.state_dtype: "bf16" counts the offloaded state at 2 bytes per value, on the host
    or in the swap files ([Note: bf16 host state], [Note: bf16 swap files])."""
    offload_param: str = "none"
    pin_optimizer: bool = False
    pin_param: bool = False
    tp: int = 1
    """tensor_parallel.autotp_size: ranks splitting each planned layer ([Note: per-rank shares])."""
    pp: int = 1
    """pipeline.stages: each stage's ranks hold a run of decoder layers ([Note: pipeline stage shares])."""
    pp_schedule: str = "1F1B"
    micro_batches: int | None = None
    """pipeline.micro_batches when a number; None ("auto": gradient accumulation): pp, the fewest 1F1B takes."""
    host: HostReading | None = None
    """The host the ranks of a node share, as the engine reads it (the doctor's machine): sizes the first
    step of offload_optimizer.ratio "auto" ([Note: auto start sizing] in estimate_auto.py); None: unknown,
    everything offloaded."""

    @property
    def axes_text(self) -> str:
        parts = [f"tp {self.tp}"] * (self.tp > 1) + [f"pp {self.pp}"] * (self.pp > 1)
        return ", ".join(parts)

    def axes(self, world: int) -> Axes:
        return Axes(world=world, tp=self.tp, pp=self.pp)


def optimizer_kind(spec: Any) -> str:
    """The estimator's optimizer key for a config's ``optimizer`` block (None: the Trainer's AdamW)."""
    if spec is None:
        return "adamw"
    name = spec.type.lower()
    if "sgd" in name:
        momentum = spec.params.get("momentum", 0) if isinstance(spec.params, dict) else 0
        return "sgd_momentum" if isinstance(momentum, (int, float)) and momentum else "sgd"
    return "adamw"


def spec_from_config(config: Any, *, micro_batch: int | None = None, seq_len: int | None = None,
                     gradient_checkpointing: bool = False) -> RunSpec:
    """A RunSpec from a loaded HfZeroConfig (None: hf_zero's defaults, stage 0)."""
    if config is None:
        return RunSpec(micro_batch=micro_batch or 1, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing)
    zero = config.zero
    dtype = config.precision.dtype if isinstance(config.precision.dtype, str) else None
    bucket = zero.reduce_bucket_size if isinstance(zero.reduce_bucket_size, int) else "auto"
    config_micro = config.train_micro_batch_size_per_gpu
    if micro_batch is None:
        micro_batch = config_micro if isinstance(config_micro, int) and not isinstance(config_micro, bool) else 1
    return RunSpec(
        stage=zero.stage, dtype=dtype, optimizer=optimizer_kind(config.optimizer), reduce_bucket_size=bucket,
        micro_batch=micro_batch, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
        offload_optimizer=zero.offload_optimizer.device if zero.stage >= 1 else "none",
        offload_ratio=zero.offload_optimizer.ratio if isinstance(zero.offload_optimizer.ratio, float) else 1.0,
        offload_auto=not isinstance(zero.offload_optimizer.ratio, float),
        offload_host_share=zero.offload_optimizer.host_share if isinstance(zero.offload_optimizer.host_share, float)
        else 0.0,
        offload_state_dtype=zero.offload_optimizer.state_dtype if zero.stage >= 1 else "fp32",
        offload_param=zero.offload_param.device if zero.stage == 3 else "none",
        pin_optimizer=zero.offload_optimizer.pin_memory, pin_param=zero.offload_param.pin_memory,
        tp=config.tensor_parallel.autotp_size, pp=config.pipeline.stages, pp_schedule=config.pipeline.schedule,
        micro_batches=config.pipeline.micro_batches if isinstance(config.pipeline.micro_batches, int) else None,
    )


@dataclass(frozen=True)
class RankBytes:
    """Bytes one rank needs, by where they live."""

    dtype: str
    device: dict[str, int]
    """params (incl. stage-3 gathered), grads (peak), optimizer (state + masters), activations."""
    offloaded: dict[str, int] = field(default_factory=dict)
    """Offload tier ("cpu"/"nvme") -> bytes kept there."""
    pinned: int = 0
    """Host bytes pinned (page-locked) when CUDA is present."""

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    def breakdown(self) -> str:
        from hf_zero.byte_units import fmt_bytes

        return ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.device.items() if v)


def _rank_bytes_for(model: ModelInfo, spec: RunSpec, ranks: int, dtype: str) -> RankBytes:
    """One rank's bytes; with pipeline stages, those of the heaviest stage's ranks."""
    stages = [_stage_bytes(model, spec, ranks, dtype, s) for s in range(spec.pp)]
    return max(stages, key=lambda r: r.device_total + sum(r.offloaded.values()))


def activations_counted(model: ModelInfo, spec: RunSpec) -> bool:
    """Whether the sizes include activations (a decoder model, --seq_len given, a modelled schedule)."""
    return model.shape is not None and spec.seq_len is not None and (spec.pp == 1 or spec.pp_schedule in SCHEDULES)


def _activations(model: ModelInfo, spec: RunSpec, dtype: str, pp_stage: int) -> int:
    if not activations_counted(model, spec):
        return 0
    common = dict(micro_batch=spec.micro_batch, seq_len=spec.seq_len, dtype=dtype,
                  gradient_checkpointing=spec.gradient_checkpointing, tp=spec.tp)
    if spec.pp == 1:
        return activation_bytes(model.shape, **common)
    return stage_activation_bytes(model.shape, stage=pp_stage, pp=spec.pp, schedule=spec.pp_schedule,
                                  layers=layer_counts(model.counts.pp_split, spec.pp)[pp_stage],
                                  micro_batches=spec.micro_batches or spec.pp, **common)


def _stage_bytes(model: ModelInfo, spec: RunSpec, ranks: int, dtype: str, pp_stage: int) -> RankBytes:
    counts, world = model.counts.per_rank(spec.axes(ranks), pp_stage)  # world: the ranks ZeRO shards over
    b = estimate_bytes(counts, stage=spec.stage, world=world, dtype=dtype, optimizer=spec.optimizer,
                       model_dtype=model.dtype, reduce_bucket_size=spec.reduce_bucket_size)
    gathered = gathered_params_bytes(counts, world=world, dtype=dtype, model_dtype=model.dtype) if spec.stage == 3 else 0
    act = _activations(model, spec, dtype, pp_stage)
    params, optimizer = b["params"], b["optimizer_state"]
    offloaded: dict[str, int] = {}
    pinned = 0
    if spec.stage >= 1 and spec.offload_optimizer != "none":
        # the estimator's host bytes of optimizer offload (fp32 master + state + grad copy), scaled by
        # ratio: that share of the elements moves to the host, the rest keeps its device state
        off = estimate_bytes(counts, stage=spec.stage, world=world, dtype=dtype, optimizer=spec.optimizer,
                             model_dtype=model.dtype, reduce_bucket_size=spec.reduce_bucket_size,
                             offload_optimizer=True, state_dtype=spec.offload_state_dtype)
        ratio = first_step(model, spec, world, dtype, counts).ratio if spec.offload_auto else spec.offload_ratio
        offloaded[spec.offload_optimizer] = round(ratio * off["host_offload"])
        optimizer = round((1 - ratio) * optimizer)
        if spec.offload_optimizer == "nvme":  # masters and state in the files; the grad copy stays on the host
            grads = round(ratio * b["grads_at_step"])
            offloaded["nvme"] -= grads
            kept = round(spec.offload_host_share * offloaded["nvme"])  # [Note: host share]
            offloaded["nvme"] -= kept
            offloaded["cpu"] = offloaded.get("cpu", 0) + grads + kept
            if spec.pin_optimizer:
                pinned += grads + kept
        if spec.offload_optimizer == "cpu" and spec.pin_optimizer:
            pinned += round(ratio * 2 * b["grads_at_step"])  # fp32 master + grad buffer, a shard each
    if spec.stage == 3 and spec.offload_param != "none":
        # every unit's shards, frozen ones too (units.py [Note: host shards]); the persistent
        # params that stay on the device are a few norms and biases, not modelled
        shard_params = params
        offloaded[spec.offload_param] = offloaded.get(spec.offload_param, 0) + shard_params
        params -= shard_params
        if spec.offload_param == "cpu" and spec.pin_param:
            pinned += shard_params
    device = {"params": params + gathered, "grads": b["peak_grads"], "optimizer": optimizer, "activations": act}
    return RankBytes(dtype=dtype, device=device, offloaded=offloaded, pinned=pinned)


def first_step(model: ModelInfo, spec: RunSpec, world: int, dtype: str, counts: ParamCounts | None = None) -> AutoStart:
    """How offload_optimizer.ratio "auto" starts on ``spec.host`` (``estimate_auto.auto_start``: the engine's
    rule); with device "nvme" or no host known, everything offloaded. ``counts``, ``world``: a rank's
    share and the ranks ZeRO shards over (default: the model's at ``world`` ranks)."""
    if counts is None:
        counts, world = model.counts.per_rank(spec.axes(world))
    host = spec.host if spec.offload_optimizer == "cpu" else None
    return auto_start(counts, stage=spec.stage, world=world, dtype=dtype, optimizer=spec.optimizer, host=host,
                      model_dtype=model.dtype, reduce_bucket_size=spec.reduce_bucket_size,
                      state_dtype=spec.offload_state_dtype)


def auto_host(model: ModelInfo, available: int, total: int, ranks: int) -> HostReading:
    """The host the first step of ratio "auto" is sized on (``RunSpec.host``): this machine's memory as
    the engine reads it (``host_memory.meminfo``), less the model copy each of its ``ranks`` loads, which
    the host memory check counts beside the offload."""
    from hf_zero.engine.offload.host_room import HostReading

    return HostReading(max(0, available - ranks * host_load_bytes(model)), total, ranks)


def tp_problem(model: ModelInfo, spec: RunSpec, world: int) -> str | None:
    """Why ``spec.tp`` or ``spec.pp`` cannot split this model at ``world`` ranks (``ParamCounts.per_rank``'
    refusal), else None."""
    try:
        model.counts.per_rank(spec.axes(world))
    except ValueError as error:
        return str(error)
    return None


def rank_bytes(model: ModelInfo, spec: RunSpec, world: int) -> RankBytes:
    """Per-rank bytes of ``spec`` at ``world`` ranks; "auto" dtype: the larger of bf16 and fp32."""
    if spec.dtype is not None:
        return _rank_bytes_for(model, spec, world, spec.dtype)
    options = [_rank_bytes_for(model, spec, world, d) for d in ("bf16", "fp32")]
    return max(options, key=lambda r: r.device_total + sum(r.offloaded.values()))


def host_load_bytes(model: ModelInfo) -> int:
    """The full model in its load dtype: what each rank holds on the host before sharding."""
    return model.counts.total * DTYPE_BYTES[model.dtype]


def variant(spec: RunSpec, **changes: Any) -> RunSpec:
    return replace(spec, **changes)
