"""load_config: a path, dict or HfZeroConfig in, a validated HfZeroConfig out.

The format is picked by content, not file name: a top-level ``"hf_zero"`` key means
hf_zero's own schema (:mod:`hf_zero.config.native`), anything else is read as a DeepSpeed
config (:mod:`hf_zero.config.deepspeed`). "auto" values survive loading; call
:func:`hf_zero.config.resolve_config` once TrainingArguments are known.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hf_zero.config.deepspeed import from_deepspeed
from hf_zero.config.errors import ConfigError, show
from hf_zero.config.native import VERSION_KEY, from_native
from hf_zero.config.schema import HfZeroConfig
from hf_zero.config.small_file import read_small_text

DICT_SOURCE = "<dict>"
"""Source name used in messages for a config passed as a dict."""


def load_config(
    path_or_dict: str | os.PathLike[str] | dict[str, Any] | HfZeroConfig,
    *,
    source: str | None = None,
) -> HfZeroConfig:
    """Load and validate a config; "auto" values are kept for :func:`resolve_config`.

    ``path_or_dict`` is a JSON file path (DeepSpeed or hf_zero schema), an already parsed
    dict, or an HfZeroConfig (returned unchanged). ``source`` names the config in messages
    (default: the path as given, or ``"<dict>"``). Emits at most one ``UserWarning`` naming
    keys that are accepted but not applied. Raises :class:`ConfigError` for any bad input.
    """
    if isinstance(path_or_dict, HfZeroConfig):
        return path_or_dict
    if isinstance(path_or_dict, dict):
        raw: Any = path_or_dict
        source = source or DICT_SOURCE
    elif isinstance(path_or_dict, (str, os.PathLike)):
        source = source or os.fspath(path_or_dict)
        raw = _read_json(path_or_dict, source)
    else:
        raise ConfigError(
            f"cannot load a config from a {type(path_or_dict).__name__}; "
            "allowed: a JSON file path, a dict, or an HfZeroConfig"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level of {source} must be a JSON object, not {show(raw)}")
    if VERSION_KEY in raw:
        return from_native(raw, source)
    return from_deepspeed(raw, source)


def _read_json(path: str | os.PathLike[str], source: str) -> Any:
    text = read_small_text(path)  # a regular file of at most 1 MiB: never /dev/zero, a FIFO, a directory
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: _no_duplicates(pairs, source))
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"invalid JSON in {source} at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except RecursionError:
        raise ConfigError(f"invalid JSON in {source}: nested too deeply") from None


def _no_duplicates(pairs: list[tuple[str, Any]], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"duplicate key {key!r} in {source}; JSON keeps only the last, so remove one")
        out[key] = value
    return out
