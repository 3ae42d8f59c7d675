"""resolve_config: the one place where "auto" is filled and the file is checked against the Trainer.

It mirrors ``HfTrainerDeepSpeedConfig.trainer_config_process`` / ``trainer_config_finalize``
in ``transformers/integrations/deepspeed.py``: "auto" takes the TrainingArguments value, and a
value written in the file must agree with TrainingArguments (the user asked for two different
things; guessing which one they meant would hide a bug). Every disagreement is reported at
once, in one ConfigError.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from hf_zero.config.auto import AUTO
from hf_zero.config.checks import divisors
from hf_zero.config.errors import ArgumentsMismatch, ConfigError, show
from hf_zero.config.schema import HfZeroConfig, OptimizerSpec, SchedulerSpec, ZeroConfig
from hf_zero.config.unsupported import refuse

AUTO_SOURCES: tuple[tuple[str, str], ...] = (
    ("train_micro_batch_size_per_gpu", "TrainingArguments.per_device_train_batch_size"),
    ("gradient_accumulation_steps", "TrainingArguments.gradient_accumulation_steps"),
    ("train_batch_size", "per_device_train_batch_size * gradient_accumulation_steps * world_size / sequence_parallel_size"),
    ("sequence_parallel_size", "TrainingArguments.parallelism_config.sp_size (1 without one)"),
    ("pipeline.micro_batches", "TrainingArguments.gradient_accumulation_steps (each of its batches one micro-batch)"),
    ("gradient_clipping", "TrainingArguments.max_grad_norm"),
    ("precision.dtype", '"bf16" if TrainingArguments.bf16, "fp16" if TrainingArguments.fp16, else "fp32"'),
    ("optimizer.params.lr", "TrainingArguments.learning_rate"),
    ("optimizer.params.betas", "[TrainingArguments.adam_beta1, TrainingArguments.adam_beta2]"),
    ("optimizer.params.eps", "TrainingArguments.adam_epsilon"),
    ("optimizer.params.weight_decay", "TrainingArguments.weight_decay"),
    ("scheduler.params.warmup_min_lr", "0 (never checked against TrainingArguments)"),
    ("scheduler.params.warmup_max_lr", "TrainingArguments.learning_rate"),
    ("scheduler.params.warmup_num_steps", "max(1, TrainingArguments.get_warmup_steps(num_training_steps))"),
    ("scheduler.params.total_num_steps", "num_training_steps"),
    ("zero.reduce_bucket_size", "hidden_size * hidden_size (5e8 without a hidden size)"),
    ("zero.allgather_bucket_size", "hidden_size * hidden_size (5e8 without a hidden size)"),
    ("zero.prefetch_bucket_size", "int(0.9 * hidden_size * hidden_size) (5e7 without a hidden size)"),
    ("zero.param_persistence_threshold", "10 * hidden_size (1e5 without a hidden size)"),
    ("zero.gather_16bit_weights_on_model_save", "true"),
)
"""Documentation of the rules below: hf_zero key -> where "auto" takes its value from."""


def resolve_config(
    config: HfZeroConfig,
    training_args: Any,
    *,
    world_size: int,
    hidden_size: int | None = None,
    num_training_steps: int | None = None,
    sequence_parallel_size: int | None = None,
) -> HfZeroConfig:
    """Return ``config`` with every "auto" filled from ``training_args`` and checked against it.

    ``training_args`` is a ``transformers.TrainingArguments`` or any object with the same
    attributes. ``hidden_size`` (the model's) sizes "auto" buckets. Scheduler "auto" step
    counts stay "auto" while ``num_training_steps`` is None. After this, the three batch-size
    fields are ints even if the file left them out. ``sequence_parallel_size`` is the Trainer's
    (its ``parallelism_config.sp_size``; None without one): the ranks of one sequence-parallel group
    share a batch, so the batch-size product counts world_size / sequence_parallel_size. Raises :class:`ArgumentsMismatch` (a
    ConfigError) naming every value that disagrees with TrainingArguments, one line each, and
    :class:`UnsupportedConfig` for a combination this version does not run (unsupported.py).
    """
    if not isinstance(config, HfZeroConfig):
        raise TypeError(f"resolve_config needs an HfZeroConfig, got {type(config).__name__}")
    _check_count("world_size", world_size, minimum=1)
    _check_count("hidden_size", hidden_size, minimum=1, none=True)
    _check_count("num_training_steps", num_training_steps, minimum=0, none=True)
    match = _Matcher(config.source or "the config")
    args = training_args

    auto_find = bool(getattr(args, "auto_find_batch_size", False))
    micro = match("train_micro_batch_size_per_gpu", config.train_micro_batch_size_per_gpu,
                  "per_device_train_batch_size", args.per_device_train_batch_size, must_match=not auto_find)
    gas = match("gradient_accumulation_steps", config.gradient_accumulation_steps,
                "gradient_accumulation_steps", args.gradient_accumulation_steps)
    sp = _sequence_parallel(config.sequence_parallel_size, sequence_parallel_size, world_size, match)
    ranks = _data_parallel_ranks(world_size, sp, config.tensor_parallel.autotp_size, match,
                                 pp=config.pipeline.stages)
    pipeline = _micro_batches(config.pipeline, micro, gas, match)
    batch = _train_batch_size(config.train_batch_size, micro, gas, ranks, match)
    clipping = match("gradient_clipping", config.gradient_clipping, "max_grad_norm", args.max_grad_norm)
    dtype = match("precision.dtype (DeepSpeed: bf16.enabled / fp16.enabled)", config.precision.dtype,
                  "bf16/fp16", _trainer_dtype(args))
    optimizer = _optimizer(config.optimizer, args, match)
    scheduler = _scheduler(config.scheduler, args, num_training_steps, match)
    match.raise_conflicts()

    resolved = dataclasses.replace(
        config,
        zero=resolve_zero_sizes(config.zero, hidden_size),
        precision=dataclasses.replace(config.precision, dtype=dtype),
        gradient_clipping=clipping,
        train_batch_size=batch,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=gas,
        optimizer=optimizer,
        scheduler=scheduler,
        sequence_parallel_size=sp,
        pipeline=pipeline,
    )
    refuse(resolved)  # what this version cannot run, now that the dtype is known (unsupported.py)
    return resolved


class _Matcher:
    """``fill_match`` from transformers: fill "auto"/None, else record a disagreement."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.conflicts: list[str] = []

    def __call__(self, key: str, value: Any, hf_key: str, hf_value: Any, *, must_match: bool = True) -> Any:
        if value is AUTO or value is None:
            return hf_value
        if must_match and not _equal(value, hf_value):
            self.conflict(f"{key} = {show(value)} in {self.source} but TrainingArguments.{hf_key} = "
                          f"{show(hf_value)}; make them equal or set the file's value to \"auto\"")
        return value

    def conflict(self, message: str) -> None:
        self.conflicts.append(message)

    def raise_conflicts(self) -> None:
        if self.conflicts:
            raise ArgumentsMismatch("\n".join(self.conflicts))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _check_count(name: str, value: Any, *, minimum: int, none: bool = False) -> None:
    if none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if none else "")
        raise ConfigError(f"resolve_config({name}=...) is invalid", key=name, value=value, allowed=allowed)


def _trainer_dtype(args: Any) -> str:
    bf16 = bool(getattr(args, "bf16", False) or getattr(args, "bf16_full_eval", False))
    fp16 = bool(getattr(args, "fp16", False) or getattr(args, "fp16_full_eval", False))
    if bf16 and fp16:
        raise ArgumentsMismatch("TrainingArguments asks for both bf16 and fp16; choose one")
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def _sequence_parallel(value: Any, trainer: int | None, world_size: int, match: _Matcher) -> int:
    """The file's sequence_parallel_size against the Trainer's parallelism_config.sp_size."""
    if value is AUTO or value is None:
        value = 1 if trainer is None else trainer
    elif trainer is not None and value != trainer:
        match.conflict(f"sequence_parallel_size = {value} in {match.source} but TrainingArguments.parallelism_config."
                       f"sp_size = {trainer}; make them equal or set the file's value to \"auto\"")
    if world_size % value:
        match.conflict(f"sequence_parallel_size = {value} does not divide world_size = {world_size}: the ranks are "
                       f"laid out as (world_size / sequence_parallel_size, sequence_parallel_size); allowed: "
                       f"{divisors(world_size)}")
        return 1
    return value


def _data_parallel_ranks(world_size: int, sp: int, tp: int, match: _Matcher, *, pp: int = 1) -> tuple[str, int]:
    """The ranks that each train on their own batch, and their name: the ranks of a sequence-parallel,
    a tensor-parallel group (hf_zero/tensor_parallel) or a pipeline (hf_zero/pipeline) share one."""
    if world_size % (sp * tp):
        match.conflict(f"tensor_parallel.autotp_size = {tp} does not divide world_size = {world_size}"
                       f"{f' / sequence_parallel_size {sp}' if sp > 1 else ''}: the ranks are laid out as (world_size "
                       f"/ autotp_size, autotp_size); allowed: {divisors(world_size // sp)}")
        tp = 1
    if world_size % (sp * tp * pp) and tp > 1:
        match.conflict(f"pipeline.stages = {pp} with tensor_parallel.autotp_size = {tp}: stages * autotp_size = "
                       f"{pp * tp} does not divide world_size = {world_size}: the ranks are laid out as (stages, "
                       f"world_size / (stages * autotp_size), autotp_size), stage-outer, tp-inner; allowed stages: "
                       f"{divisors(world_size // (sp * tp))}")
        pp = 1
    elif world_size % (sp * tp * pp):
        match.conflict(f"pipeline.stages = {pp} does not divide world_size = {world_size}: the ranks are laid out "
                       f"as (stages, world_size / stages), stage-outer; allowed: {divisors(world_size // (sp * tp))}")
        pp = 1
    names = [n for n, v in (("sequence_parallel_size", sp), ("tensor_parallel.autotp_size", tp),
                            ("pipeline.stages", pp)) if v > 1]
    return (" / ".join(["world_size", *names]), world_size // (sp * tp * pp))


def _micro_batches(config: Any, micro: Any, gas: Any, match: _Matcher) -> Any:
    """Pipeline micro-batches: "auto" is the accumulation steps (each of the Trainer's batches one
    micro-batch: the Trainer reads which from the config as loaded); a number must divide the
    per-device batch, which it splits."""
    if config.micro_batches is AUTO:
        return dataclasses.replace(config, micro_batches=gas)
    if config.stages > 1 and isinstance(micro, int) and micro % config.micro_batches:
        match.conflict(f"pipeline.micro_batches = {config.micro_batches} does not divide per_device_train_batch_size "
                       f"= {micro}: each batch is split into that many micro-batches; allowed: {divisors(micro)} "
                       "or \"auto\" (the gradient accumulation steps, each batch one micro-batch)")
    return config


def _train_batch_size(value: Any, micro: Any, gas: Any, ranks: tuple[str, int], match: _Matcher) -> Any:
    """DeepSpeed's invariant: train_batch_size = micro batch * accumulation steps * data-parallel ranks
    (``ranks``: their name and number; world size, divided by the sequence- and tensor-parallel sizes)."""
    name, world_size = ranks
    if match.conflicts:
        return value  # the product of conflicting factors would only add noise
    expected = micro * gas * world_size
    if value is AUTO or value is None:
        return expected
    if isinstance(value, int) and value % world_size:
        match.conflict(f"train_batch_size = {value} in {match.source} is not divisible by "
                       f"{name} = {world_size}; set it to \"auto\" or a multiple of {world_size}")
    elif value != expected:
        match.conflict(
            f"train_batch_size = {value} in {match.source} but train_micro_batch_size_per_gpu ({micro}) * "
            f"gradient_accumulation_steps ({gas}) * {name} ({world_size}) = {expected}; "
            "make them equal or set train_batch_size to \"auto\""
        )
    return value


def _optimizer(spec: OptimizerSpec | None, args: Any, match: _Matcher) -> OptimizerSpec | None:
    if spec is None:
        return None
    hf = {
        "lr": ("learning_rate", args.learning_rate),
        "betas": ("adam_beta1, adam_beta2", [args.adam_beta1, args.adam_beta2]),
        "eps": ("adam_epsilon", args.adam_epsilon),
        "weight_decay": ("weight_decay", args.weight_decay),
    }
    params = dict(spec.params)
    for key, (hf_key, hf_value) in hf.items():
        if key in params:
            params[key] = match(f"optimizer.params.{key}", params[key], hf_key, hf_value)
    return dataclasses.replace(spec, params=params)


def _scheduler(spec: SchedulerSpec | None, args: Any, steps: int | None, match: _Matcher) -> SchedulerSpec | None:
    if spec is None:
        return None
    params = dict(spec.params)
    if params.get("warmup_min_lr") is AUTO:
        params["warmup_min_lr"] = 0
    if "warmup_max_lr" in params:
        params["warmup_max_lr"] = match("scheduler.params.warmup_max_lr", params["warmup_max_lr"],
                                        "learning_rate", args.learning_rate)
    if steps is not None:
        if "total_num_steps" in params:
            params["total_num_steps"] = match("scheduler.params.total_num_steps", params["total_num_steps"],
                                              "max_steps (num_training_steps)", steps)
        if "warmup_num_steps" in params:
            params["warmup_num_steps"] = match("scheduler.params.warmup_num_steps", params["warmup_num_steps"],
                                               "warmup_steps", max(1, _warmup_steps(args, steps)))
    return dataclasses.replace(spec, params=params)


def _warmup_steps(args: Any, steps: int) -> int:
    """TrainingArguments.get_warmup_steps, or its rule for objects that only carry the fields."""
    if callable(getattr(args, "get_warmup_steps", None)):
        return int(args.get_warmup_steps(steps))
    warmup = getattr(args, "warmup_steps", 0) or getattr(args, "warmup_ratio", 0) or 0
    return int(warmup) if warmup >= 1 else math.ceil(steps * warmup)


def resolve_zero_sizes(zero: ZeroConfig, hidden: int | None) -> ZeroConfig:
    """The zero section with its "auto" sizes filled from the model's hidden size (None: defaults)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ZeroConfig)}

    def pick(name: str, from_hidden: int | None) -> Any:
        value = getattr(zero, name)
        if value is not AUTO:
            return value
        return from_hidden if from_hidden is not None else defaults[name]

    square = hidden * hidden if hidden is not None else None
    return dataclasses.replace(
        zero,
        reduce_bucket_size=pick("reduce_bucket_size", square),
        allgather_bucket_size=pick("allgather_bucket_size", square),
        prefetch_bucket_size=pick("prefetch_bucket_size", None if square is None else int(0.9 * square)),
        param_persistence_threshold=pick("param_persistence_threshold", None if hidden is None else 10 * hidden),
        gather_16bit_weights_on_model_save=pick("gather_16bit_weights_on_model_save", True),
    )
