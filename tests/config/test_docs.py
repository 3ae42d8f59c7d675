"""docs/configuration.md is generated from the field metadata and must match it."""

from __future__ import annotations

import dataclasses
import pathlib

from hf_zero.config import NOT_APPLIED, HfZeroConfig
from hf_zero.config.deepspeed import key_mapping
from hf_zero.config.docs import render_markdown

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_docs_match_the_code():
    assert DOC.read_text() == render_markdown(), (
        "docs/configuration.md is stale; run: python -m hf_zero.config.docs > docs/configuration.md"
    )


def test_docs_name_every_key():
    text = render_markdown()
    for native, ds in key_mapping():
        assert f"`{native}`" in text
        if ds is not None:
            assert ds in text
    for key, entry in NOT_APPLIED.items():
        assert f"| `{key}` | {entry.reason.replace('|', chr(92) + '|')} |" in text


def test_top_level_fields_have_rows():
    text = render_markdown()
    for field in dataclasses.fields(HfZeroConfig):
        if field.compare:
            assert f"| `{field.name}` |" in text
