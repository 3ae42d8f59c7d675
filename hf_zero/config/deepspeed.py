"""DeepSpeed JSON -> HfZeroConfig.

The key mapping is not written here twice: each config field names its DeepSpeed key in its
metadata (:func:`hf_zero.config.fields.setting`), and :func:`key_mapping` walks the dataclass
tree to list ``(hf_zero path, DeepSpeed path)`` pairs. This module adds only what metadata
cannot say: spelling aliases, the two precision switches, and which blocks exist.

Reading a file is two passes. :func:`_flatten` walks the JSON, resolving aliases, rejecting
unknown keys (with the closest valid key) and setting aside known-but-not-applied keys;
:func:`_build` then feeds the flat ``{DeepSpeed path: value}`` dict to the dataclasses,
whose own validation errors are relocated onto the DeepSpeed key path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hf_zero.config.auto import AUTO, is_auto
from hf_zero.config.errors import ConfigError, unknown_key
from hf_zero.config.fields import nested_type
from hf_zero.config.not_applied import NOT_APPLIED, is_quiet, warn_not_applied
from hf_zero.config.schema import HfZeroConfig, PrecisionConfig

ALIASES: dict[str, str] = {
    "bfloat16": "bf16",
    "zero_optimization.stage3_gather_fp16_weights_on_model_save":
        "zero_optimization.stage3_gather_16bit_weights_on_model_save",
    "zero_optimization.gather_16bit_weights_on_model_save":
        "zero_optimization.stage3_gather_16bit_weights_on_model_save",
    "zero_optimization.prefetch_bucket_size": "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.param_persistence_threshold": "zero_optimization.stage3_param_persistence_threshold",
    "zero_optimization.max_live_parameters": "zero_optimization.stage3_max_live_parameters",
    "zero_optimization.max_reuse_distance": "zero_optimization.stage3_max_reuse_distance",
    "zero_optimization.model_persistence_threshold": "zero_optimization.stage3_model_persistence_threshold",
}
"""Other spellings DeepSpeed accepts -> the canonical DeepSpeed path."""

DTYPE_SWITCHES = ("bf16.enabled", "fp16.enabled")
"""DeepSpeed's two precision switches; together they give ``precision.dtype``."""

STATE_SWITCH = "bf16.bf16_optimizer_states"
"""DeepSpeed's switch for bf16 optimizer state; with optimizer offload ("cpu" or "nvme") it is
``zero.offload_optimizer.state_dtype`` "bf16" (true) or "fp32" (false)."""

_NOT_IN_DEEPSPEED = {"zero.offload_param.ratio", "zero.offload_param.state_dtype",  # param offload has neither
                     "zero.offload_param.host_share", "zero.offload_param.device_share"}


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def key_mapping(cls: type = HfZeroConfig, native: str = "", ds: str = "") -> list[tuple[str, str | None]]:
    """Every leaf field as ``(hf_zero path, DeepSpeed path or None)``, in declaration order."""
    rows: list[tuple[str, str | None]] = []
    for field in dataclasses.fields(cls):
        if not field.compare:
            continue  # bookkeeping (HfZeroConfig.source), not configuration
        native_path = _join(native, field.name)
        ds_key = field.metadata.get("deepspeed")
        sub = nested_type(field)
        if sub is not None:
            rows += key_mapping(sub, native_path, _join(ds, ds_key) if ds_key else ds)
        elif native_path == "precision.dtype":
            rows.append((native_path, " / ".join(DTYPE_SWITCHES)))
        elif native_path == "zero.offload_optimizer.state_dtype":
            rows.append((native_path, STATE_SWITCH))
        elif ds_key is None or native_path in _NOT_IN_DEEPSPEED:
            rows.append((native_path, None))
        else:
            rows.append((native_path, _join(ds, ds_key)))
    return rows


_LEAVES = {ds for _, ds in key_mapping() if ds is not None and "/" not in ds} | set(DTYPE_SWITCHES)
_BLOCKS = {p.rsplit(".", 1)[0] for p in _LEAVES if "." in p}
_KNOWN = _LEAVES | _BLOCKS | set(NOT_APPLIED) | set(ALIASES)
_PRESENT = object()  # stored under a block's path: the block is in the file, even if it is {}


def from_deepspeed(raw: dict[str, Any], source: str) -> HfZeroConfig:
    """Build an HfZeroConfig from a parsed DeepSpeed JSON object (see the module docstring)."""
    leaves: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    ignored: list[str] = []
    _flatten(raw, "", leaves, spelled, ignored, source)
    _drop_param_offload_below_stage3(leaves, ignored)
    config = _build(HfZeroConfig, leaves, spelled, "", source)
    config = dataclasses.replace(config, source=source)
    warn_not_applied(ignored, source)
    return config


def _flatten(block: dict, prefix: str, leaves: dict, spelled: dict, ignored: list, source: str) -> None:
    for key, value in block.items():
        if not isinstance(key, str):
            raise ConfigError(f"key {key!r} under {prefix or 'the top level'} is not a string", source=source)
        path = _join(prefix, key)
        canonical = ALIASES.get(path, path)
        if canonical in spelled or canonical in leaves:
            raise ConfigError(f"{spelled.get(canonical, canonical)!r} and {path!r} in {source} "
                              "are the same setting; give only one")
        spelled[canonical] = path
        if canonical in NOT_APPLIED and not is_quiet(canonical, value):
            ignored.append(path)
        if canonical in _LEAVES:  # may also be NOT_APPLIED: read and validated all the same
            leaves[canonical] = value
        elif canonical in NOT_APPLIED:
            continue
        elif canonical in _BLOCKS:
            if value is None:
                continue  # "optimizer": null is the same as no optimizer block
            if not isinstance(value, dict):
                raise ConfigError("not an object", key=path, value=value, allowed="a JSON object", source=source)
            leaves[canonical] = _PRESENT
            _flatten(value, canonical, leaves, spelled, ignored, source)
        else:
            valid = {k[len(prefix) + 1:] if prefix else k for k in _KNOWN if _parent(k) == prefix}
            elsewhere = sorted(k for k in _KNOWN if k == key or k.endswith(f".{key}"))
            raise unknown_key(prefix, key, valid, source, elsewhere[0] if len(elsewhere) == 1 else None)


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _drop_param_offload_below_stage3(leaves: dict, ignored: list) -> None:
    """DeepSpeed silently ignores offload_param below stage 3; hf_zero says so, then does the same."""
    stage = leaves.get("zero_optimization.stage", 0)
    device = leaves.get("zero_optimization.offload_param.device", "none")
    if stage in (0, 1, 2) and not isinstance(stage, bool) and device in ("cpu", "nvme"):
        ignored.append("zero_optimization.offload_param")
        for path in [p for p in leaves if p.startswith("zero_optimization.offload_param")]:
            del leaves[path]


def _build(cls: type, leaves: dict, spelled: dict, prefix: str, source: str, defaults: dict | None = None) -> Any:
    kwargs: dict[str, Any] = dict(defaults or {})
    for field in dataclasses.fields(cls):
        ds_key = field.metadata.get("deepspeed")
        sub = nested_type(field)
        if sub is not None:
            sub_prefix = _join(prefix, ds_key) if ds_key else prefix
            optional = field.default is None
            if optional and leaves.get(sub_prefix) is not _PRESENT:
                continue
            kwargs[field.name] = _build(sub, leaves, spelled, sub_prefix, source, field.metadata["defaults"])
        elif cls is PrecisionConfig and field.name == "dtype":
            kwargs["dtype"] = _dtype(leaves, spelled, source)
        elif field.name == "state_dtype" and prefix == "zero_optimization.offload_optimizer":
            if leaves.get(STATE_SWITCH) is not None:
                kwargs["state_dtype"] = _state_dtype(leaves, spelled, source)
        elif ds_key is not None and _join(prefix, ds_key) in leaves:
            kwargs[field.name] = leaves[_join(prefix, ds_key)]
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            key = spelled.get(_join(prefix, ds_key), _join(prefix, ds_key))
            raise ConfigError(f"missing required key {key!r} in {source}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.relocate(key=_where(cls, err.field, prefix, spelled), source=source) from None


def _where(cls: type, field_path: str | None, prefix: str, spelled: dict) -> str | None:
    """The DeepSpeed key path for a field path relative to ``cls`` (as the user spelled it)."""
    if field_path is None:
        return None
    name, _, rest = field_path.partition(".")
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if cls is PrecisionConfig and name == "dtype":
        return " / ".join(DTYPE_SWITCHES)
    path = _join(prefix, field.metadata.get("deepspeed") or name)
    if rest:
        path = _join(path, rest)
    if path == "zero_optimization.offload_optimizer.state_dtype":
        path = STATE_SWITCH  # (the one field whose DeepSpeed key is in another block)
    return spelled.get(path, path)


def _state_dtype(leaves: dict, spelled: dict, source: str) -> str:
    """``bf16.bf16_optimizer_states`` -> the offloaded optimizer state's dtype."""
    value = leaves[STATE_SWITCH]
    if not isinstance(value, bool):
        raise ConfigError("not a boolean", key=spelled.get(STATE_SWITCH, STATE_SWITCH), value=value,
                          allowed="true (bf16 moments of the offloaded optimizer state), false or null",
                          source=source)
    return "bf16" if value else "fp32"


def _dtype(leaves: dict, spelled: dict, source: str) -> Any:
    """DeepSpeed's two switches -> one dtype. An absent switch means "not said", not false."""
    values = {}
    for path in DTYPE_SWITCHES:
        value = leaves.get(path)
        if value is not None and not isinstance(value, bool) and not is_auto(value):
            raise ConfigError("not a boolean", key=spelled.get(path, path), value=value,
                              allowed='true, false, "auto" or null', source=source)
        values[path] = AUTO if is_auto(value) else value
    bf16, fp16 = values["bf16.enabled"], values["fp16.enabled"]
    if bf16 is True and fp16 is True:
        raise ConfigError(f"bf16.enabled and fp16.enabled are both true in {source}; enable at most one")
    if bf16 is True or fp16 is True:
        return "bf16" if bf16 is True else "fp16"
    if bf16 is AUTO or fp16 is AUTO:
        return AUTO
    if bf16 is False or fp16 is False:
        return "fp32"
    return AUTO
