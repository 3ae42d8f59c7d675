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


# Applied through TrainingArguments: the file's value must equal the flag (resolve_config), and the
# Trainer applies the flag; nothing outside hf_zero/config needs to read the config's copy.
_APPLIED_BY_THE_TRAINER = {"gradient_clipping", "train_batch_size", "train_micro_batch_size_per_gpu",
                           "gradient_accumulation_steps",
                           "precision.loss_scale"}  # only 0 runs (the Trainer's scaler is dynamic); the rest is refused


def _names_read_outside_config() -> set[str]:
    """Every attribute name read (``x.name``) in hf_zero outside hf_zero/config."""
    import ast

    root = DOC.parents[1] / "hf_zero"
    names = set()
    for path in root.rglob("*.py"):
        if (root / "config") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
    return names


def test_keys_marked_applied_are_read_by_the_code():
    """The "applied" column is computed (NOT_APPLIED, PARTLY_APPLIED); a key it calls applied must be read
    by some code outside hf_zero/config, or be one the Trainer applies through its own flag. A field nothing
    reads (overlap_comm once) fails here until it goes into NOT_APPLIED."""
    from hf_zero.config.docs import applied_text

    read = _names_read_outside_config()
    unread = [native for native, ds in key_mapping()
              if ds is not None and applied_text(ds) != "not applied"
              and native.rsplit(".", 1)[-1] not in read and native not in _APPLIED_BY_THE_TRAINER]
    assert unread == [], "read these fields in the engine, or list their DeepSpeed keys in NOT_APPLIED"


def test_partly_applied_keys_are_read_into_the_config():
    from hf_zero.config.not_applied import PARTLY_APPLIED

    mapped = {ds for _, ds in key_mapping() if ds is not None}
    assert [k for k in PARTLY_APPLIED if k not in mapped or k in NOT_APPLIED] == []
