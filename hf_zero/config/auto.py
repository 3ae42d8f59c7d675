"""The ``"auto"`` placeholder: "take this value from TrainingArguments (or the model)".

DeepSpeed configs written for Hugging Face use the string ``"auto"`` wherever the
Trainer already knows the answer. Loading turns every such string into the singleton
:data:`AUTO`; :func:`hf_zero.config.resolve_config` is the only place that replaces it.
"""

from __future__ import annotations

import enum
from typing import Any


class Auto(enum.Enum):
    """Type of the :data:`AUTO` sentinel (an enum, so it survives copy and pickle)."""

    AUTO = "auto"

    def __repr__(self) -> str:
        return '"auto"'

    __str__ = __repr__


AUTO = Auto.AUTO
"""The one ``"auto"`` value; compare with ``is``."""


def is_auto(value: Any) -> bool:
    """True for :data:`AUTO` and for the JSON string ``"auto"``."""
    return value is AUTO or (isinstance(value, str) and value == "auto")
