"""The config files getting-started.md shows load as it says: without warnings, at the stage it names."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from hf_zero.config import load_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "getting-started.md"


def example(name: str) -> dict:
    match = re.search(rf"`{re.escape(name)}`:\n\n```json\n(.*?)\n```", DOC.read_text(), re.S)
    assert match is not None, f"getting-started.md no longer shows {name}"
    return json.loads(match.group(1))


@pytest.mark.parametrize(("name", "stage"), [("zero2.json", 2), ("zero3.json", 3)])
def test_examples_load_without_warnings(name, stage):
    assert "Both load without warnings." in DOC.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(example(name), source=name).zero.stage == stage
