"""Shared helpers for the config tests: the sample DeepSpeed files and a quiet loader."""

from __future__ import annotations

import json
import pathlib
import warnings

from hf_zero.config import load_config

DATA = pathlib.Path(__file__).parent / "data"
SAMPLES = sorted(p.name for p in DATA.glob("*.json"))


def sample(name: str) -> dict:
    """A sample DeepSpeed config as a fresh dict."""
    return json.loads((DATA / name).read_text())


def load_quiet(obj, **kwargs):
    """load_config with the not-applied warning silenced (for tests about something else)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_config(obj, **kwargs)
