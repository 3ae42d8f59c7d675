"""Field validators for the config dataclasses.

Each checker reads one field of a dataclass under construction, validates it, and stores
the normalised value back (``5e8`` -> ``500000000``, ``"auto"`` -> :data:`AUTO`).
Errors name the field relative to the dataclass (``field``) and, for direct Python use,
the key ``ClassName.field``; loaders relocate them onto the file's key path.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from hf_zero.config.auto import AUTO, is_auto
from hf_zero.config.errors import ConfigError


def fail(obj: object, field: str, problem: str, *, value: Any, allowed: str | None = None) -> ConfigError:
    """A value error for ``obj.field`` holding ``value``."""
    return ConfigError(
        problem, key=f"{type(obj).__name__}.{field}", field=field, value=value, allowed=allowed
    )


def divisors(n: int) -> list[int]:
    """Every d >= 1 that divides ``n``: the sizes a parallel axis of ``n`` ranks may take."""
    return [d for d in range(1, n + 1) if n % d == 0]


def world_axis(size: object, world_size: int, *, key: str, off: str, layout: str) -> int:
    """A parallel axis size (``sequence_parallel_size``, ``autotp_size``): an integer >= 1 that
    divides the world size; ``off`` says what 1 means, ``layout`` how the ranks are laid out."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{key} = {size!r}: must be an integer >= 1 (1: {off})")
    if world_size % size:
        raise ValueError(f"{key} = {size} does not divide the world size {world_size}: the ranks are laid out "
                         f"as {layout}; allowed here: {divisors(world_size)}")
    return size


def _store(obj: object, field: str, value: Any) -> Any:
    object.__setattr__(obj, field, value)  # frozen dataclass: normalise during __post_init__
    return value


def _allowed(kind: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
             auto: bool = False, none: bool = False) -> str:
    """The 'allowed:' text, e.g. ``an integer >= 0 and <= 3 or "auto"``."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    text = " ".join([kind, " and ".join(bounds)]).rstrip()
    return text + (' or "auto"' if auto else "") + (" or null" if none else "")


def integer(obj: object, field: str, *, minimum: int | None = None, maximum: int | None = None,
            auto: bool = False, none: bool = False) -> Any:
    """An int (bool excluded; integral floats such as ``5e8`` accepted), optionally AUTO or None."""
    value = getattr(obj, field)
    allowed = _allowed("an integer", low=minimum, high=maximum, auto=auto, none=none)
    if auto and is_auto(value):
        return _store(obj, field, AUTO)
    if none and value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(obj, field, "not an integer", allowed=allowed, value=value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise fail(obj, field, "out of range", allowed=allowed, value=value)
    return _store(obj, field, value)


def number(obj: object, field: str, *, minimum: float | None = None, maximum: float | None = None,
           min_open: bool = False, auto: bool = False) -> Any:
    """A finite float (ints accepted and converted, bool excluded), optionally AUTO."""
    value = getattr(obj, field)
    allowed = _allowed("a finite number", low=minimum, high=maximum, low_open=min_open, auto=auto)
    if auto and is_auto(value):
        return _store(obj, field, AUTO)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(obj, field, "not a number", allowed=allowed, value=value)
    try:
        value = float(value)
    except OverflowError:
        raise fail(obj, field, "too large", allowed=allowed, value=value) from None
    if not math.isfinite(value):
        raise fail(obj, field, "not finite", allowed=allowed, value=value)
    too_low = minimum is not None and (value <= minimum if min_open else value < minimum)
    if too_low or (maximum is not None and value > maximum):
        raise fail(obj, field, "out of range", allowed=allowed, value=value)
    return _store(obj, field, value)


def boolean(obj: object, field: str, *, auto: bool = False, none: bool = False) -> Any:
    """``true``/``false`` only (no 0/1), optionally AUTO or None."""
    value = getattr(obj, field)
    if auto and is_auto(value):
        return _store(obj, field, AUTO)
    if none and value is None:
        return None
    if not isinstance(value, bool):
        raise fail(obj, field, "not a boolean", allowed=_allowed("true or false", auto=auto, none=none), value=value)
    return value


def choice(obj: object, field: str, choices: Collection[str], *, auto: bool = False) -> Any:
    """One of the given strings, optionally AUTO."""
    value = getattr(obj, field)
    if auto and is_auto(value):
        return _store(obj, field, AUTO)
    if not isinstance(value, str) or value not in choices:
        allowed = _allowed("one of " + ", ".join(repr(c) for c in choices), auto=auto)
        raise fail(obj, field, "not a valid choice", allowed=allowed, value=value)
    return value


def text(obj: object, field: str, *, none: bool = False) -> Any:
    """A non-empty string, optionally None."""
    value = getattr(obj, field)
    if none and value is None:
        return None
    if not isinstance(value, str) or not value:
        allowed = _allowed("a non-empty string", none=none)
        raise fail(obj, field, "not a non-empty string", allowed=allowed, value=value)
    return value


def json_params(obj: object, field: str, auto_keys: Collection[str]) -> dict[str, Any]:
    """A JSON object whose top-level values may be AUTO only under ``auto_keys``; stored as a copy."""
    value = getattr(obj, field)
    if not isinstance(value, dict):
        raise fail(obj, field, "not an object", allowed="a JSON object", value=value)
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise fail(obj, field, f"key {key!r} is not a string", allowed="string keys", value=value)
        if is_auto(item):
            if key not in auto_keys:
                allowed = '"auto" only for ' + (", ".join(sorted(auto_keys)) or "no key")
                raise fail(obj, f"{field}.{key}", '"auto" cannot be filled in for this key',
                           allowed=allowed, value=item)
            out[key] = AUTO
        else:
            out[key] = _plain_json(obj, f"{field}.{key}", item, depth=0)
    return _store(obj, field, out)


def _plain_json(obj: object, field: str, value: Any, depth: int) -> Any:
    """A deep copy of a JSON value that contains no ``"auto"`` (only top-level params can be auto)."""
    if depth > 32:
        raise fail(obj, field, "nested too deeply", allowed="at most 32 levels of nesting", value=value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if value == "auto":
            raise fail(obj, field, '"auto" is only understood as a whole parameter value',
                       allowed="a literal value", value=value)
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_json(obj, f"{field}[{i}]", v, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain_json(obj, f"{field}.{k}", v, depth + 1) for k, v in value.items()}
    raise fail(obj, field, "not a JSON value", value=value,
               allowed="null, true/false, numbers, strings, lists, objects")
