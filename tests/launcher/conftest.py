"""Fixtures for the launcher tests: a restored environment, stubs for config and trainer."""

import os
import socket
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture
def restore_environ():
    """Give the test os.environ to change freely; restore it exactly afterwards."""
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeConfigError(ValueError):
    """Stands in for hf_zero.config.ConfigError (also a ValueError)."""


@pytest.fixture
def fake_config(monkeypatch):
    """Stub `hf_zero.config.load_config`/`config_to_dict`: files named `bad*` fail.

    Returns the list of (path, kwargs) load_config was called with.
    """
    import hf_zero.config

    calls = []
    real_load = hf_zero.config.load_config

    def load_config(path, **kwargs):
        if not isinstance(path, (str, os.PathLike)):
            return path  # an already loaded config, passed on by hf_zero.trainer.check
        calls.append((path, kwargs))
        if os.path.basename(path).startswith("bad"):
            raise FakeConfigError(f"{path}: unknown key 'stgae'; did you mean 'stage'?")
        return real_load({"zero_optimization": {"stage": 0}}, source=path)

    monkeypatch.setattr(hf_zero.config, "load_config", load_config, raising=False)
    monkeypatch.setattr(hf_zero.config, "config_to_dict", dict, raising=False)
    return calls


@pytest.fixture
def fake_activate(monkeypatch):
    """Stub `hf_zero.trainer.activate`; returns the list of configs it was called with."""
    import hf_zero.trainer

    calls = []
    monkeypatch.setattr(hf_zero.trainer, "activate", calls.append, raising=False)
    return calls
