"""docs/from-fsdp-accelerate.md's key-by-key table is the one hf-zero convert-accelerate runs on."""

from __future__ import annotations

from pathlib import Path

from hf_zero.accelerate_config import mapping_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "from-fsdp-accelerate.md"


def test_key_table_is_generated_from_the_rules():
    assert "\n" + mapping_markdown() + "\n" in DOC.read_text(), (
        "docs/from-fsdp-accelerate.md's key table is stale: paste "
        "python -c 'from hf_zero.accelerate_config import mapping_markdown; print(mapping_markdown())' into it")
