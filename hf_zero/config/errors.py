"""ConfigError, the one exception type for bad configuration input, and its helpers."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from typing import Any

from hf_zero.config.auto import AUTO

_NO_VALUE = object()


def show(value: Any) -> str:
    """Render a config value the way it would be written in JSON (``true``, ``null``, ``"auto"``)."""
    if value is AUTO:
        return '"auto"'
    try:
        text = json.dumps(value, allow_nan=True, sort_keys=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ConfigError(ValueError):
    """A configuration the user wrote (file, dict or TrainingArguments) is not acceptable.

    Two shapes:

    * a *value* error, built with ``key``/``value``/``allowed``; renders as
      ``zero_optimization.reduce_bucket_size = -5 in zero2.json: must be >= 0; allowed: ...``.
      ``field`` is the key relative to the dataclass that raised it, so a loader can
      :meth:`relocate` the error onto the key path of the file it is reading;
    * a free-form error (``ConfigError("unknown key ...")``) whose text is final.
    """

    def __init__(
        self,
        problem: str,
        *,
        key: str | None = None,
        field: str | None = None,
        value: Any = _NO_VALUE,
        allowed: str | None = None,
        source: str | None = None,
    ) -> None:
        self.problem = problem
        self.key = key
        self.field = field
        self.value = value
        self.allowed = allowed
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        if self.key is None:
            return self.problem if self.source is None else f"{self.problem} (in {self.source})"
        text = self.key
        if self.value is not _NO_VALUE:
            text += f" = {show(self.value)}"
        if self.source is not None:
            text += f" in {self.source}"
        text += f": {self.problem}"
        if self.allowed is not None:
            text += f"; allowed: {self.allowed}"
        return text

    def relocate(self, *, key: str | None = None, source: str | None = None) -> ConfigError:
        """The same error, reported under the file's key path ``key`` and file name ``source``."""
        return ConfigError(
            self.problem,
            key=key if key is not None else self.key,
            field=self.field,
            value=self.value,
            allowed=self.allowed,
            source=source if source is not None else self.source,
        )


class ArgumentsMismatch(ConfigError):
    """The config disagrees with the script's ``TrainingArguments`` (found when the Trainer is created).

    Every rank resolves the same file against the same arguments, so every rank raises the same
    error: ``hf_zero.run`` prints it once (rank 0) as one ``hf_zero: ...`` line and exits 2 on every
    rank, instead of a traceback per rank."""


def unknown_key(path: str, key: str, valid: Iterable[str], source: str, elsewhere: str | None = None) -> ConfigError:
    """Error for a key that is not valid at ``path``, naming the closest valid key.

    ``elsewhere`` is the full path where a key of this name *is* valid, if any
    (``aio`` written inside ``zero_optimization`` instead of at the top level).
    """
    valid = sorted(valid)
    full = f"{path}.{key}" if path else key
    message = f"unknown key {full!r} in {source}"
    if elsewhere is not None:
        parent = elsewhere.rpartition(".")[0]
        return ConfigError(f"{message}; {key!r} belongs " + (f"under {parent!r}" if parent else "at the top level"))
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return ConfigError(f"{message}; did you mean {close[0]!r}?")
    where = f"under {path!r}" if path else "at the top level"
    return ConfigError(f"{message}; valid keys {where}: {', '.join(valid)}")
