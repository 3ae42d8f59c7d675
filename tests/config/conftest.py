"""Fixtures for the config tests."""

from __future__ import annotations

import json
import pathlib

import pytest


@pytest.fixture
def write_json(tmp_path):
    """Write an object (or raw text) to a JSON file and return its path."""

    def write(obj, name: str = "config.json") -> pathlib.Path:
        path = tmp_path / name
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        return path

    return write
