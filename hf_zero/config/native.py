"""hf_zero's own JSON schema <-> HfZeroConfig.

The schema is the dataclass tree written as nested JSON, marked by ``"hf_zero": 1``::

    {"hf_zero": 1,
     "zero": {"stage": 2, "reduce_bucket_size": 50000000, "offload_optimizer": {"device": "cpu"}},
     "precision": {"dtype": "bf16"},
     "gradient_clipping": "auto"}

Absent keys take the dataclass defaults; ``"auto"`` is written as the string ``"auto"``.
:func:`config_to_dict` writes every key, so ``load_config(config_to_dict(c)) == c``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hf_zero.config.auto import AUTO
from hf_zero.config.deepspeed import key_mapping
from hf_zero.config.errors import ConfigError, unknown_key
from hf_zero.config.fields import nested_type
from hf_zero.config.not_applied import NOT_APPLIED, is_quiet, warn_not_applied
from hf_zero.config.schema import HfZeroConfig

VERSION_KEY = "hf_zero"
"""Top-level key that marks a file as hf_zero's own schema (absent: a DeepSpeed file)."""

SCHEMA_VERSION = 1
"""The only schema version so far."""

_NOT_WRITTEN = {"source"}  # HfZeroConfig fields that are bookkeeping, not configuration


def from_native(raw: dict[str, Any], source: str) -> HfZeroConfig:
    """Build an HfZeroConfig from a parsed hf_zero JSON object (see the module docstring)."""
    version = raw.get(VERSION_KEY)
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise ConfigError("unsupported hf_zero schema version", key=VERSION_KEY, value=version,
                          allowed=str(SCHEMA_VERSION), source=source)
    body = {k: v for k, v in raw.items() if k != VERSION_KEY}
    config = _build(HfZeroConfig, body, "", source, {})
    config = dataclasses.replace(config, source=source)
    warn_not_applied(_not_applied_fields(config), source)
    return config


def _build(cls: type, raw: dict, prefix: str, source: str, defaults: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _NOT_WRITTEN}
    kwargs: dict[str, Any] = dict(defaults)
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"key {key!r} under {prefix or 'the top level'} is not a string", source=source)
        if key not in fields:
            valid = set(fields) | ({VERSION_KEY} if not prefix else set())
            raise unknown_key(prefix, key, valid, source)
        field = fields[key]
        sub = nested_type(field)
        path = f"{prefix}.{key}" if prefix else key
        if sub is None or (value is None and field.default is None):
            kwargs[key] = value
        elif isinstance(value, dict):
            kwargs[key] = _build(sub, value, path, source, field.metadata["defaults"])
        else:
            raise ConfigError("not an object", key=path, value=value, allowed="a JSON object", source=source)
    for name, field in fields.items():
        if name not in kwargs and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            path = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"missing required key {path!r} in {source}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        key = None if err.field is None else (f"{prefix}.{err.field}" if prefix else err.field)
        raise err.relocate(key=key, source=source) from None


def _not_applied_fields(config: HfZeroConfig) -> list[str]:
    """hf_zero paths of fields whose DeepSpeed key is in NOT_APPLIED and whose value matters."""
    out = []
    for native_path, ds_path in key_mapping():
        if ds_path in NOT_APPLIED and not is_quiet(ds_path, _get(config, native_path)):
            out.append(native_path)
    return out


def _get(config: Any, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name, None)
    return config


def config_to_dict(config: HfZeroConfig) -> dict[str, Any]:
    """A plain JSON-able dict in hf_zero's own schema ("auto" for AUTO, every key written)."""
    if not isinstance(config, HfZeroConfig):
        raise TypeError(f"config_to_dict needs an HfZeroConfig, got {type(config).__name__}")
    return {VERSION_KEY: SCHEMA_VERSION, **_to_plain(config)}


def _to_plain(value: Any) -> Any:
    if value is AUTO:
        return "auto"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name))
                for f in dataclasses.fields(value) if f.name not in _NOT_WRITTEN}
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
