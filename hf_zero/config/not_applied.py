"""DeepSpeed keys hf_zero accepts but does not act on, and the one warning that names them.

Real DeepSpeed files carry many keys for features hf_zero does not have or does differently.
Refusing them would make every existing file unusable; silently dropping them would hide
that a setting has no effect. So: a file may contain any key listed in :data:`NOT_APPLIED`,
and loading it emits **one** ``UserWarning`` naming every such key whose value would have
changed DeepSpeed's behaviour (values listed in ``quiet`` are what hf_zero does anyway).

A path naming a block (``"aio"``) covers everything inside it; its contents are not checked.
Edit this table when the engine starts honouring a key: remove the entry, map the key in
:mod:`hf_zero.config.deepspeed` (usually by adding a field), and regenerate the docs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from hf_zero.config.key_warning import warn_at_key


class NotApplied(NamedTuple):
    """Why a DeepSpeed key is ignored, and which of its values need no warning."""

    reason: str
    quiet: tuple[Any, ...] = ()


class _Disabled:
    """Quiet marker: a block whose ``"enabled"`` is false, whatever else it holds."""

    def __repr__(self) -> str:
        return '{"enabled": false, ...}'


_OFF = _Disabled()
_LOGGER = "a DeepSpeed monitor; use TrainingArguments.report_to"

NOT_APPLIED: dict[str, NotApplied] = {
    # top level
    "steps_per_print": NotApplied("the Trainer's logging_steps governs printing", (10,)),
    "wall_clock_breakdown": NotApplied("use the torch profiler; hf_zero labels each phase", (False,)),
    "zero_allow_untested_optimizer": NotApplied("hf_zero shards any torch optimizer", (True, False)),
    "zero_force_ds_cpu_optimizer": NotApplied("hf_zero runs the given optimizer on offloaded state", (True, False)),
    "aio": NotApplied("NVMe offload does its own file I/O (pread/pwrite in 1 MiB-aligned requests from a "
                      "thread pool); libaio tuning does not apply"),
    "activation_checkpointing.partition_activations": NotApplied(
        "nothing to apply: with sequence_parallel_size > 1 every rank's checkpoints are already its sequence "
        "shard; without it true is refused (config/unsupported.py): partitioning them across a tensor_parallel "
        "group is not built yet", (True, False)),
    "activation_checkpointing.synchronize_checkpoint_boundary": NotApplied(
        "hf_zero never synchronizes the device in the step", (False,)),
    "activation_checkpointing.profile": NotApplied("use the torch profiler (hf_zero::checkpoint_offload labels)",
                                                   (False,)),
    "flops_profiler": NotApplied("use the torch profiler", (_OFF,)),
    "tensorboard": NotApplied(_LOGGER, (_OFF,)),
    "wandb": NotApplied(_LOGGER, (_OFF,)),
    "csv_monitor": NotApplied(_LOGGER, (_OFF,)),
    "comet": NotApplied(_LOGGER, (_OFF,)),
    "comms_logger": NotApplied("use the torch profiler to see collectives", (_OFF,)),
    "communication_data_type": NotApplied("gradients are reduced in the gradient dtype", (None,)),
    "prescale_gradients": NotApplied("gradients are averaged once, after reduction", (False,)),
    "gradient_predivide_factor": NotApplied("gradients are averaged once, after reduction", (1, 1.0)),
    "sparse_gradients": NotApplied("sparse gradients are not supported", (False,)),
    "amp": NotApplied("NVIDIA apex AMP is not supported; use bf16/fp16", (_OFF,)),
    "torch_autocast": NotApplied("the Trainer controls autocast", (_OFF,)),
    "checkpoint": NotApplied("checkpoint layout follows the Trainer's save settings"),
    "data_types": NotApplied("gradient accumulation dtype follows precision.dtype"),
    "memory_breakdown": NotApplied("use torch.cuda memory statistics", (False,)),
    "dump_state": NotApplied("DeepSpeed debug output", (False,)),
    "disable_allgather": NotApplied("parameter gathering cannot be disabled", (False,)),
    "fp32_allreduce": NotApplied("gradients are reduced in the gradient dtype", (False,)),
    "elasticity": NotApplied("elastic training is not supported", (_OFF,)),
    "autotuning": NotApplied("the DeepSpeed autotuner is not supported", (_OFF,)),
    "compression_training": NotApplied("DeepSpeed compression is not supported"),
    "data_efficiency": NotApplied("DeepSpeed data efficiency is not supported", (_OFF,)),
    "curriculum_learning": NotApplied("curriculum learning is not supported", (_OFF,)),
    "tensor_parallel.partition_config": NotApplied(
        "hf_zero splits the layers of the model's own tp_plan (or a decoder block's); set model.tp_plan instead"),
    "tensor_parallel.preset_model": NotApplied(
        "hf_zero splits the layers of the model's own tp_plan (or a decoder block's); set model.tp_plan instead"),
    "tensor_parallel.tp_overlap_comm": NotApplied(
        "the tensor-parallel all-reduces run in line with compute (their overlap is not built yet)", (False,)),
    "pipeline.partition": NotApplied(
        "hf_zero splits the decoder layers evenly by count (DeepSpeed's \"uniform\")", ("uniform", "best")),
    "pipeline.seed_layers": NotApplied("layers are split from the model as loaded", (False,)),
    "pipeline.activation_checkpoint_interval": NotApplied(
        "use the Trainer's --gradient_checkpointing (per decoder layer)", (0,)),
    "pipeline.pipe_partitioned": NotApplied("activations travel whole between stages", (True, False)),
    "pipeline.grad_partitioned": NotApplied("activation gradients travel whole between stages", (True, False)),
    "compile": NotApplied("use TrainingArguments.torch_compile"),
    # bf16 / fp16 blocks
    "bf16.immediate_grad_update": NotApplied("gradients are accumulated in the engine's buffers", (False,)),
    "bf16.check_grad_overflow": NotApplied("bf16 does not loss-scale, so overflow is not checked", (False,)),
    "fp16.auto_cast": NotApplied("the Trainer casts inputs", (False,)),
    "fp16.consecutive_hysteresis": NotApplied("hysteresis counts overflows, consecutive or not", (False,)),
    "fp16.fp16_master_weights_and_grads": NotApplied("master weights are always fp32", (False,)),
    # zero_optimization
    "zero_optimization.reduce_scatter": NotApplied("gradients are always reduce-scattered", (True,)),
    "zero_optimization.overlap_comm": NotApplied(
        "gradient reductions always start during backward, as each bucket fills (stage 1: in the backward of "
        "the accumulation boundary); there is no non-overlapped mode, and false would only be slower", (True, False, None)),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": NotApplied(
        "a stage-3 save_model always writes the full weights, streamed unit by unit (no rank holds the whole "
        "model); with false DeepSpeed would write no model weights (hf_zero writes them: nothing is lost)",
        (True, False, "auto")),
    "zero_optimization.allgather_bucket_size": NotApplied(
        "all-gathers follow the gradient buckets (reduce_bucket_size; at stage 3 one unit each)", (500_000_000,)),
    "zero_optimization.contiguous_gradients": NotApplied("the engine always uses contiguous buffers", (True,)),
    "zero_optimization.round_robin_gradients": NotApplied("offloaded gradients are copied per bucket", (False,)),
    "zero_optimization.sub_group_size": NotApplied(
        "the offloaded optimizer step is tiled by offload_optimizer.buffer_size (nvme), 2**26 elements (cpu)",
        (1_000_000_000,)),
    "zero_optimization.stage3_max_reuse_distance": NotApplied(
        "gathered parameters are freed by the prefetch schedule", (1_000_000_000,)),
    "zero_optimization.allgather_partitions": NotApplied("updated shards are always all-gathered", (True,)),
    "zero_optimization.ignore_unused_parameters": NotApplied("unused parameters are always tolerated", (True,)),
    "zero_optimization.load_from_fp32_weights": NotApplied("checkpoints restore fp32 master weights", (True,)),
    "zero_optimization.elastic_checkpoint": NotApplied("elastic checkpoints are not supported", (False,)),
    "zero_optimization.memory_efficient_linear": NotApplied("hf_zero never patches F.linear", (True, False)),
    "zero_optimization.override_module_apply": NotApplied("hf_zero never patches nn.Module.apply", (True, False)),
    "zero_optimization.zero_hpz_partition_size": NotApplied("ZeRO++ hierarchical partitioning is not supported", (1,)),
    "zero_optimization.zero_quantized_weights": NotApplied("ZeRO++ quantized weights are not supported", (False,)),
    "zero_optimization.zero_quantized_nontrainable_weights": NotApplied(
        "ZeRO++ quantized weights are not supported", (False,)),
    "zero_optimization.zero_quantized_gradients": NotApplied("ZeRO++ quantized gradients are not supported", (False,)),
    "zero_optimization.zeropp_loco_param": NotApplied("ZeRO++ LoCo is not supported", (None,)),
    "zero_optimization.mics_shard_size": NotApplied("MiCS sharding is not supported", (-1,)),
    "zero_optimization.mics_hierarchical_params_gather": NotApplied("MiCS sharding is not supported", (False,)),
    "zero_optimization.stage3_module_granularity_threshold": NotApplied(
        "parameters are fetched per module", (0,)),
    "zero_optimization.stage3_model_persistence_threshold": NotApplied(
        "only stage3_param_persistence_threshold bounds unsharded parameters", (9223372036854775807,)),
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": NotApplied("parameters are all-gathered", (False,)),
    "zero_optimization.stage3_allgather_sequential": NotApplied("parameters are gathered in buckets", (False,)),
    "zero_optimization.stage3_partition_stream_chunk_size": NotApplied(
        "parameters are partitioned on the meta device, never materialised whole", (0,)),
    "zero_optimization.leaf_module": NotApplied("fetch granularity is one module's own parameters", ({},)),
    "zero_optimization.log_trace_cache_warnings": NotApplied("there is no trace cache", (False,)),
    "zero_optimization.use_multi_rank_bucket_allreduce": NotApplied("buckets are reduce-scattered", (True, False)),
    "zero_optimization.legacy_stage1": NotApplied("there is one stage-1 implementation", (False,)),
    "zero_optimization.pipeline_loading_checkpoint": NotApplied("pipeline parallelism is not supported", (False,)),
    "zero_optimization.enable_sanity_checks": NotApplied("invariants are always checked", (False, True)),
    "zero_optimization.save_muon_momentum_buffer_in_memory": NotApplied("Muon is not special-cased", (False,)),
    "zero_optimization.zenflow": NotApplied("ZenFlow is not supported", (None,)),
    "zero_optimization.cpu_offload": NotApplied(
        'deprecated DeepSpeed alias; write offload_optimizer: {"device": "cpu"}', (False, None)),
    "zero_optimization.cpu_offload_param": NotApplied(
        'deprecated DeepSpeed alias; write offload_param: {"device": "cpu"}', (False, None)),
    "zero_optimization.cpu_offload_use_pin_memory": NotApplied(
        "deprecated DeepSpeed alias; write pin_memory inside offload_*", (False, None)),
    "zero_optimization.offload_param.buffer_count": NotApplied(
        "NVMe parameter shards are read through 3 staging buffers, each as large as the largest unit shard", (5,)),
    "zero_optimization.offload_param.buffer_size": NotApplied(
        "NVMe parameter shards are read through 3 staging buffers, each as large as the largest unit shard", (100_000_000,)),
    "zero_optimization.offload_param.max_in_cpu": NotApplied(
        "NVMe-offloaded parameters are not cached in host memory", (1_000_000_000,)),
    "zero_optimization.offload_optimizer.pipeline_read": NotApplied(
        "NVMe reads are always overlapped with the host step", (True, False)),
    "zero_optimization.offload_optimizer.pipeline_write": NotApplied(
        "NVMe writes are always overlapped with the host step", (True, False)),
    "zero_optimization.offload_optimizer.pipeline": NotApplied(
        "NVMe reads and writes are always overlapped with the host step", (True, False)),
    "zero_optimization.offload_optimizer.fast_init": NotApplied("optimizer state is created lazily", (False,)),
    "zero_optimization.offload_optimizer.super_offload": NotApplied("Superchip offload is not supported", (False,)),
    "zero_optimization.offload_optimizer.convert_grad_on_cpu": NotApplied(
        "gradients are converted where they are reduced", (True, False)),
    "zero_optimization.offload_optimizer.cpuadam_cores_perc": NotApplied(
        "CPU threads follow torch.get_num_threads()", (0.8,)),
}
"""DeepSpeed key path -> why hf_zero ignores it. See the module docstring."""


PARTLY_APPLIED: dict[str, str] = {
    "activation_checkpointing.contiguous_memory_optimization": "only with cpu_checkpointing (one pinned host "
                                                               "arena); warned about without it",
    "activation_checkpointing.number_checkpoints": "only with cpu_checkpointing: the pinned buffers one forward "
                                                   "may hold",
    "fp16.loss_scale": "only 0: dynamic scaling, as DeepSpeed's (trainer/loss_scaling.py); a static scale is "
                       "refused (config/unsupported.py)",
}
"""DeepSpeed key path -> how far hf_zero applies it (read into the config, but not everywhere or every
value); the "applied" column of docs/configuration.md. Loading warns about none of them."""


def is_quiet(path: str, value: Any) -> bool:
    """True if ``value`` at ``path`` needs no warning (it is what hf_zero does anyway)."""
    return any(_same(value, quiet) for quiet in NOT_APPLIED[path].quiet)


def _same(value: Any, quiet: Any) -> bool:
    if quiet is _OFF:
        return isinstance(value, dict) and value.get("enabled") is False
    if isinstance(value, bool) or isinstance(quiet, bool):
        return value is quiet  # JSON true is not 1
    return type(value) in (int, float, str, dict, type(None)) and value == quiet


def warn_not_applied(keys: Iterable[str], source: str) -> None:
    """Emit one UserWarning naming every key in ``keys`` (sorted), or nothing; once per job, at the
    first key's line of ``source`` (key_warning.py)."""
    keys = sorted(set(keys))
    if not keys:
        return
    reasons = "; ".join(f"{key}: {_reason(key)}" for key in keys)
    warn_at_key(f"hf_zero accepts but does not apply these keys of {source}: {', '.join(keys)} ({reasons})",
                source, keys[0])


def _reason(key: str) -> str:
    for path in (key, *_parents(key)):
        if path in NOT_APPLIED:
            return NOT_APPLIED[path].reason
    return "this value is ignored"


def _parents(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
