"""Every DeepSpeed key path the docs name (`zero_optimization.x.y`, `fp16.x`, `bf16.x`) is one hf_zero reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hf_zero.config.deepspeed import ALIASES, DTYPE_SWITCHES, key_mapping
from hf_zero.config.not_applied import NOT_APPLIED

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
KEY = re.compile(r"`((?:zero_optimization|fp16|bf16)(?:\.[a-z0-9_]+)+)`")


def known_keys() -> set[str]:
    leaves = {ds for _, ds in key_mapping() if ds is not None and "/" not in ds} | set(DTYPE_SWITCHES)
    blocks = {path.rsplit(".", 1)[0] for path in leaves if "." in path}
    return leaves | blocks | set(NOT_APPLIED) | set(ALIASES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_keys_named_in_the_docs_exist(page):
    known = known_keys()
    named = set(KEY.findall(page.read_text()))
    assert sorted(named - known) == [], f"{page.name} names keys hf_zero does not read"


def test_the_oom_faq_names_its_keys():
    """The FAQ's steps each name the key to change; the check above then holds them to the code."""
    assert len(set(KEY.findall((REPO / "docs" / "oom-faq.md").read_text()))) >= 8


def test_every_page_is_listed_in_the_readme():
    readme = (REPO / "README.md").read_text()
    assert [p.name for p in PAGES if p.name != "README.md" and f"docs/{p.name}" not in readme] == []


def test_every_subcommand_is_in_the_readme():
    from hf_zero.cli import build_parser

    parser = build_parser()
    [subparsers] = [a for a in parser._actions if a.dest == "command"]
    readme = (REPO / "README.md").read_text()
    assert [name for name in subparsers.choices if f"hf-zero {name}" not in readme] == []
