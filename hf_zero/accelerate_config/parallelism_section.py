"""accelerate's ``parallelism_config`` (its ``ParallelismConfig`` sizes) -> zero config keys.

accelerate lays the W ranks out as dp_replicate x dp_shard x cp x sp x tp; hf_zero as
(W / (sp * tp)) ZeRO ranks x (sp or tp) ranks that share each batch:

| accelerate                           | hf_zero                                                           |
|--------------------------------------|-------------------------------------------------------------------|
| ``tp_size`` > 1                      | ``tensor_parallel.autotp_size`` (the model's tp plan, split Megatron-style) |
| ``sp_size`` > 1 (backend "deepspeed", ALST's Ulysses) | ``sequence_parallel_size`` (hf_zero's Ulysses)   |
| ``dp_shard_size``                    | not needed: ZeRO shards over the W / (sp * tp) ranks left          |
| ``dp_replicate_size`` > 1            | refused: hybrid sharding (replicas of sharded groups) is not built |
| ``cp_size`` > 1                      | refused: context parallelism (ring attention) is not built; ``sp_size`` splits sequences too |

What the result cannot run (tp and sp together, say) is refused by the table every refusal reads
(config/unsupported.py), when the converted config is loaded. Keys are read with or without their
``parallelism_config_`` prefix, as accelerate writes and reads them.
"""

from __future__ import annotations

from typing import Any

from hf_zero.accelerate_config.conversion import Conversion, Rule, unknown

SECTION = "parallelism_config"
PREFIX = "parallelism_config_"
SP_ATTENTION = ("sdpa", "eager")  # the inner attentions hf_zero's Ulysses runs (sequence_parallel/ulysses.py)


def _key(name: str) -> str:
    return f"{SECTION}.{name}"


def _size(conv: Conversion, key: str, value: Any) -> int:
    return 1 if value is None else conv.integer(key, value, minimum=1)


def _replicate(conv: Conversion, key: str, value: Any) -> None:
    if _size(conv, key, value) > 1:
        conv.refuse(key, value, "hybrid sharding (replicas of sharded groups) is not implemented in hf_zero; shard "
                                "over every rank (dp_replicate_size 1)")
    conv.not_needed(key, value, "one replica")


def _shard(conv: Conversion, key: str, value: Any) -> None:
    _size(conv, key, value)
    conv.not_needed(key, value, "ZeRO shards over world size / (sequence_parallel_size * tensor_parallel.autotp_size) "
                                "ranks, the zero_optimization.stage deciding what")


def _context(conv: Conversion, key: str, value: Any) -> None:
    if _size(conv, key, value) > 1:
        conv.refuse(key, value, "context parallelism (ring attention) is not implemented in hf_zero; split sequences "
                                "with sp_size (hf_zero's Ulysses, sequence_parallel_size) instead")
    conv.not_needed(key, value, "no context parallelism")


def _tensor(conv: Conversion, key: str, value: Any) -> None:
    size = _size(conv, key, value)
    if size == 1:
        conv.not_needed(key, value, "no tensor parallelism")
    else:
        conv.mapped(key, value, "tensor_parallel.autotp_size", size,
                    "the Linear layers of the model's tp plan split over that many ranks, ZeRO over the rest")


def _sequence(conv: Conversion, key: str, value: Any) -> None:
    size = _size(conv, key, value)
    if size == 1:
        conv.not_needed(key, value, "no sequence parallelism")
        return
    conv.mapped(key, value, "sequence_parallel_size", size,
                "Ulysses: each sequence split over that many ranks, which train on the same batch")


def _attention(conv: Conversion, key: str, value: Any) -> None:
    if value not in (None, *SP_ATTENTION):
        conv.refuse(key, value, "hf_zero's Ulysses runs the model's own sdpa or eager attention; "
                                "flash and hub kernels are not built yet; allowed: sdpa, eager")
    conv.not_needed(key, value, "the model's own attention (its attn_implementation, sdpa or eager) runs inside "
                                "hf_zero's Ulysses")


def _sp_backend(conv: Conversion, key: str, value: Any) -> None:
    conv.choice(key, value, ("deepspeed",))
    conv.not_needed(key, value, "hf_zero's Ulysses follows DeepSpeed ALST's")


def _note(text: str):
    def convert(conv: Conversion, key: str, value: Any) -> None:
        conv.not_needed(key, value, text)
    return convert


RULES: dict[str, Rule] = {
    "parallelism_config_dp_replicate_size": Rule("not needed at 1; above 1 refused (no hybrid sharding)", _replicate),
    "parallelism_config_dp_shard_size": Rule("not needed: ZeRO shards over world size / (sp * tp) ranks", _shard),
    "parallelism_config_tp_size": Rule("above 1: `tensor_parallel.autotp_size`", _tensor),
    "parallelism_config_cp_size": Rule("not needed at 1; above 1 refused (no context parallelism: use sp_size)",
                                       _context),
    "parallelism_config_cp_backend": Rule("not needed", _note("no context parallelism")),
    "parallelism_config_cp_comm_strategy": Rule("not needed", _note("no context parallelism")),
    "parallelism_config_sp_size": Rule("above 1: `sequence_parallel_size` (hf_zero's Ulysses)", _sequence),
    "parallelism_config_sp_backend": Rule("not needed (\"deepspeed\": ALST's Ulysses, which hf_zero's follows)",
                                          _sp_backend),
    "parallelism_config_sp_seq_length": Rule("not needed: each batch is split as it comes (its length a multiple of "
                                             "sp_size)", _note("each batch is split as it comes")),
    "parallelism_config_sp_seq_length_is_variable": Rule("not needed: batch lengths may vary",
                                                         _note("batch lengths may vary")),
    "parallelism_config_sp_attn_implementation": Rule("not needed for sdpa or eager (the model's own attention); "
                                                      "others refused", _attention),
}
"""Every key of accelerate's parallelism_config section (with its prefix), in the order they are converted."""


def convert(conv: Conversion, key: str, value: Any) -> None:
    """The top-level ``parallelism_config`` key: each of its keys mapped, not needed or refused."""
    if value in (None, {}):
        conv.not_needed(key, value, "empty")
        return
    if not isinstance(value, dict):
        conv.refuse(key, value, "not a mapping of keys")
    named = {}
    for name, item in value.items():
        full = name if str(name).startswith(PREFIX) else f"{PREFIX}{name}"
        if full not in RULES:
            unknown(conv, _key(str(name)), item, [_key(k) for k in RULES])
        named[full] = item
    for name, rule in RULES.items():
        if name in named:
            rule.convert(conv, _key(name), named[name])
