"""``setting()``: a dataclass field that carries its documentation and its DeepSpeed key.

Every config field is declared with ``setting(default, doc=..., deepspeed=...)``. The metadata
drives three things, so they cannot drift apart: the generated reference in
``docs/configuration.md`` (:mod:`hf_zero.config.docs`), the DeepSpeed -> hf_zero key mapping
(:mod:`hf_zero.config.deepspeed`), and key paths in error messages.

Metadata keys:

``doc``        what the field means and why its default is what it is;
``deepspeed``  the DeepSpeed JSON key it is read from, relative to the DeepSpeed block the
               owning dataclass lives in (``None``: no DeepSpeed key);
``nested``     for a field holding another config dataclass: that class;
``defaults``   for a nested-dataclass field: defaults that differ from the nested class's own
               (``offload_param`` uses DeepSpeed's ``buffer_count`` 5 instead of 4).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    deepspeed: str | None = None,
    default_factory: Any = dataclasses.MISSING,
    nested: type | None = None,
    defaults: dict[str, Any] | None = None,
    compare: bool = True,
) -> Any:
    """A documented dataclass field (see the module docstring for the metadata keys)."""
    metadata = {
        "doc": " ".join(doc.split()),
        "deepspeed": deepspeed,
        "nested": nested,
        "defaults": defaults or {},
    }
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata=metadata, compare=compare
    )


def nested_type(field: dataclasses.Field) -> type | None:
    """The config dataclass a field holds (``zero`` -> ZeroConfig), or None for a plain value."""
    return field.metadata.get("nested")


def doc(field: dataclasses.Field) -> str:
    """The field's one-paragraph documentation."""
    return field.metadata["doc"]
