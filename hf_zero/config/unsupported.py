"""The combinations this version of hf_zero cannot run: one table, read by every refusal.

Each row of ``UNSUPPORTED`` is a predicate on a config and the sentence that refuses it, naming
the keys (as a DeepSpeed file spells them), their values and what to use instead. Every place that
refuses a config for what this version lacks calls ``refuse`` on it:

| caller | when | config |
|---|---|---|
| ``hf-zero check-config`` / ``hf-zero doctor`` (``hf_zero.trainer.check``) | before anything runs | as loaded |
| ``hf-zero launch`` preflight, ``python -m hf_zero.run`` | before any rank / before the script | as loaded, dtype from the script's ``--fp16``/``--bf16`` |
| ``resolve_config`` | when the Trainer is created | resolved against TrainingArguments |

A row is never checked anywhere else; a late raise for one of these is a bug in the table.

[Note: "auto" precision]
A file whose precision is "auto" (``fp16.enabled: "auto"``, as in transformers' example files)
takes its dtype from TrainingArguments, which only the Trainer knows. Until then ``refusals``
reports a dtype-dependent row only if it applies whatever the dtype, and ``refusals_by_dtype``
says which rows a given dtype would add, so check-config and doctor can say "with --fp16 this is
refused" without refusing a file that runs with --bf16. ``with_dtype`` fills the dtype where the
Trainer's flag is known (the script's arguments, ``check-config --fp16``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from hf_zero.config import optimizer_block
from hf_zero.config.auto import AUTO
from hf_zero.config.errors import ConfigError, show
from hf_zero.config.precision import DTYPES


class UnsupportedConfig(ConfigError, NotImplementedError):
    """The config asks for a combination this version of hf_zero does not run (a row of the table).

    A ConfigError (so ``hf_zero.run`` and ``hf-zero`` print it as one ``hf_zero: ...`` line, exit 2)
    and a NotImplementedError (the feature may come; the file is not wrong for DeepSpeed)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unsupported:
    """One combination this version cannot run."""

    name: str
    """Short handle used by tests and docs ("fp16-offload")."""
    keys: tuple[str, ...]
    """The keys involved, as a DeepSpeed file spells them."""
    applies: Callable[[Any], bool]
    """True when the config (its dtype known, or "auto") asks for this combination."""
    asked: Callable[[Any], str]
    """The keys and the values the config has, as one phrase."""
    feature: str
    """What is not implemented, as one phrase."""
    instead: str
    """What to write instead."""
    feature_of: Callable[[Any], str] | None = None
    """Where one row covers several features (one per optimizer type): the one this config asks
    for, in the message; ``feature`` then names them all (docs)."""

    def message(self, config: Any) -> str:
        where = f" in {config.source}" if config.source else ""
        feature = self.feature if self.feature_of is None else self.feature_of(config)
        return f"{self.asked(config)}{where}: {feature} is not implemented in hf_zero; {self.instead}"


def _fp16(config: Any) -> bool:
    return config.precision.dtype == "fp16"


def _refused_optimizer(config: Any) -> str | None:
    return None if config.optimizer is None else optimizer_block.refused(config.optimizer.type)


def _sequence_parallel(config: Any) -> bool:
    """sequence_parallel_size > 1 (an unset or "auto" size is not known before the Trainer fills it)."""
    size = config.sequence_parallel_size
    return isinstance(size, int) and not isinstance(size, bool) and size > 1


def _pipeline(config: Any) -> bool:
    return config.pipeline.stages > 1


def _tensor_parallel(config: Any) -> bool:
    return config.tensor_parallel.autotp_size > 1


def _offload(config: Any) -> bool:
    return config.zero.offload_optimizer.device != "none" or config.zero.offload_param.device != "none"


def _offload_devices(config: Any) -> str:
    return (f"zero_optimization.offload_optimizer.device = {show(config.zero.offload_optimizer.device)}, "
            f"zero_optimization.offload_param.device = {show(config.zero.offload_param.device)}")


def _dtype(config: Any) -> str:
    """``fp16 training``: an "auto" dtype filled from the Trainer's flag reads the same."""
    return 'precision "auto"' if config.precision.dtype is AUTO else f"{config.precision.dtype} training"


UNSUPPORTED: tuple[Unsupported, ...] = (
    Unsupported(
        name="fp16-offload",
        keys=("fp16.enabled", "zero_optimization.offload_optimizer.device"),
        applies=lambda c: _fp16(c) and c.zero.offload_optimizer.device != "none",
        asked=lambda c: f"{_dtype(c)} with zero_optimization.offload_optimizer.device = "
                        f"{show(c.zero.offload_optimizer.device)}",
        feature="optimizer offload with fp16 loss scaling",
        instead=('train in bf16 (bf16.enabled true, or "auto" with --bf16) or fp32 with the offload, '
                 'or in fp16 without offload (offload_optimizer.device and offload_param.device "none")'),
    ),
    Unsupported(
        name="fp16-static-loss-scale",
        keys=("fp16.enabled", "fp16.loss_scale"),
        applies=lambda c: _fp16(c) and c.precision.loss_scale > 0,
        asked=lambda c: f"{_dtype(c)} with fp16.loss_scale = {show(c.precision.loss_scale)}",
        feature="a static fp16 loss scale",
        instead="set fp16.loss_scale to 0 (dynamic loss scaling), or train in bf16",
    ),
    Unsupported(
        name="optimizer-type",
        keys=("optimizer.type",),
        applies=lambda c: _refused_optimizer(c) is not None,
        asked=lambda c: f"optimizer.type = {show(c.optimizer.type)}",
        feature="an optimizer type DeepSpeed builds with no torch equivalent on flat shards",
        feature_of=_refused_optimizer,
        instead=(f'use "AdamW" or another type hf_zero builds ({", ".join(optimizer_block.allowed_types())}), '
                 "or leave the optimizer block out to use the Trainer's --optim"),
    ),
    Unsupported(
        name="partition-activations",
        keys=("activation_checkpointing.partition_activations",),
        # hf_zero partitions checkpoints across the sequence-parallel group (docs/long-sequences.md): with
        # sequence parallelism each rank's checkpoints are its sequence shard: true is then what already
        # happens. Without it (sequence_parallel_size 1, or unset until the Trainer fills it) this row.
        applies=lambda c: c.activation_checkpointing.partition_activations and not _sequence_parallel(c),
        asked=lambda c: "activation_checkpointing.partition_activations = true",
        feature="partitioning activation checkpoints without sequence parallelism (DeepSpeed partitions them "
                "across its tensor-parallel group; across hf_zero's tensor_parallel group it is not built yet)",
        instead="set it to false: every rank keeps its own checkpoints whole, as DeepSpeed does without model "
                "parallelism; cpu_checkpointing moves them off the accelerator; or use sequence_parallel_size > 1",
    ),
    Unsupported(
        name="sequence-parallel-tp",
        keys=("sequence_parallel_size", "tensor_parallel.autotp_size"),
        applies=lambda c: _sequence_parallel(c) and _tensor_parallel(c),
        asked=lambda c: f"sequence_parallel_size = {c.sequence_parallel_size} with tensor_parallel.autotp_size = "
                        f"{c.tensor_parallel.autotp_size}",
        feature="sequence parallelism together with tensor parallelism",
        instead="use one of the two (sequence parallelism for long sequences, tensor parallelism for wide layers)",
    ),
    Unsupported(
        name="tensor-parallel-offload",
        keys=("tensor_parallel.autotp_size", "zero_optimization.offload_optimizer.device",
              "zero_optimization.offload_param.device"),
        applies=lambda c: _tensor_parallel(c) and _offload(c),
        asked=lambda c: f"tensor_parallel.autotp_size = {c.tensor_parallel.autotp_size} with {_offload_devices(c)}",
        feature="optimizer or parameter offload with tensor parallelism (the global norm of offloaded grads over "
                "dp and tp is not built yet)",
        instead='set offload_optimizer.device and offload_param.device to "none" (each rank holds 1 / tp of the '
                "split layers already), or leave tensor_parallel out to offload",
    ),
    Unsupported(
        name="tensor-parallel-sharded-load",
        keys=("tensor_parallel.autotp_size", "zero_optimization.stage", "zero_optimization.zero3_init_flag"),
        # zero3_init_flag unset is true at stage 3 (accelerate's default), so a plain stage-3 tp file
        # is this row: the script's from_pretrained would load sharded, and the Trainer cannot split it.
        applies=lambda c: _tensor_parallel(c) and c.zero.stage == 3 and bool(c.zero.zero3_init_flag),
        asked=lambda c: f"tensor_parallel.autotp_size = {c.tensor_parallel.autotp_size} with "
                        "zero_optimization.stage = 3 and zero_optimization.zero3_init_flag = true (its default at "
                        "stage 3)",
        feature="tensor parallelism on a model loaded sharded (the tp split needs the whole model at Trainer "
                "creation)",
        instead="set zero_optimization.zero3_init_flag to false: the model loads whole and is split, then sharded, "
                "when the Trainer is created",
    ),
    Unsupported(
        name="pipeline-stage3",
        keys=("pipeline.stages", "zero_optimization.stage"),
        applies=lambda c: _pipeline(c) and c.zero.stage == 3,
        asked=lambda c: f"pipeline.stages = {c.pipeline.stages} with zero_optimization.stage = 3",
        feature="ZeRO stage 3 inside pipeline stages (not built yet)",
        instead="use zero_optimization.stage 0, 1 or 2 with pipeline stages (each stage holds only its own layers)",
    ),
    Unsupported(
        name="pipeline-sequence-parallel",
        keys=("pipeline.stages", "sequence_parallel_size"),
        applies=lambda c: _pipeline(c) and _sequence_parallel(c),
        asked=lambda c: f"pipeline.stages = {c.pipeline.stages} with sequence_parallel_size = {c.sequence_parallel_size}",
        feature="pipeline and sequence parallelism together (not built yet)",
        instead="use one of the two",
    ),
    Unsupported(
        name="pipeline-offload",
        keys=("pipeline.stages", "zero_optimization.offload_optimizer.device", "zero_optimization.offload_param.device"),
        applies=lambda c: _pipeline(c) and _offload(c),
        asked=lambda c: f"pipeline.stages = {c.pipeline.stages} with {_offload_devices(c)}",
        feature="optimizer or parameter offload with pipeline stages (not built yet)",
        instead='set offload_optimizer.device and offload_param.device to "none"',
    ),
    Unsupported(
        name="pipeline-fp16",
        keys=("pipeline.stages", "fp16.enabled"),
        applies=lambda c: _pipeline(c) and _fp16(c),
        asked=lambda c: f"pipeline.stages = {c.pipeline.stages} with {_dtype(c)}",
        feature="fp16 loss scaling across pipeline stages (not built yet)",
        instead='train in bf16 (bf16.enabled true, or "auto" with --bf16) or fp32',
    ),
    Unsupported(
        name="sparse-attention-per-head-tp",
        keys=("sparse_attention.different_layout_per_head", "tensor_parallel.autotp_size"),
        applies=lambda c: c.sparse_attention is not None and c.sparse_attention.different_layout_per_head
        and c.tensor_parallel.autotp_size > 1,
        asked=lambda c: "sparse_attention.different_layout_per_head = true with tensor_parallel.autotp_size = "
                        f"{c.tensor_parallel.autotp_size}",
        feature="per-head sparse layouts over a tensor-parallel slice of the heads",
        instead="set different_layout_per_head to false (one layout for all heads), or leave tensor_parallel out",
    ),
)


def with_dtype(config: Any, dtype: str | None) -> Any:
    """``config`` with an "auto" dtype filled by ``dtype`` (the Trainer's flag); else unchanged."""
    if dtype is None or config.precision.dtype is not AUTO:
        return config
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dataclasses.replace(config, precision=dataclasses.replace(config.precision, dtype=dtype))


def refusals(config: Any) -> list[str]:
    """The message of every row that applies to ``config`` whatever its "auto" dtype becomes."""
    candidates = [with_dtype(config, d) for d in DTYPES] if config.precision.dtype is AUTO else [config]
    return [row.message(config) for row in UNSUPPORTED if all(row.applies(c) for c in candidates)]


def refusals_by_dtype(config: Any) -> dict[str, list[str]]:
    """For an "auto" dtype: dtype -> the messages that dtype would add to ``refusals`` ({} otherwise)."""
    if config.precision.dtype is not AUTO:
        return {}
    sure = set(refusals(config))
    out = {}
    for dtype in DTYPES:
        filled = with_dtype(config, dtype)
        extra = [row.message(filled) for row in UNSUPPORTED if row.applies(filled)]
        extra = [m for m in extra if m not in sure]
        if extra:
            out[dtype] = extra
    return out


def refuse(config: Any) -> None:
    """Raise ``UnsupportedConfig`` listing every row that applies (see ``refusals``), one per line."""
    messages = refusals(config)
    if messages:
        raise UnsupportedConfig("\n".join(messages))


def conditional_note(config: Any) -> str | None:
    """One sentence per dtype that would make an "auto" precision refused, or None."""
    flags = {"fp16": "TrainingArguments.fp16 (--fp16)", "bf16": "TrainingArguments.bf16 (--bf16)",
             "fp32": "neither TrainingArguments.fp16 nor bf16"}
    notes = [f'with {flags[d]} the "auto" precision becomes {d} and the run is refused: ' + " / ".join(messages)
             for d, messages in refusals_by_dtype(config).items()]
    return "\n".join(notes) or None


__all__ = ["UNSUPPORTED", "Unsupported", "UnsupportedConfig", "conditional_note", "refuse", "refusals",
           "refusals_by_dtype", "with_dtype"]
