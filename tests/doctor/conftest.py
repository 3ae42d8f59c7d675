"""Fixtures for the doctor tests: a machine without CUDA and with plenty of memory unless a test
says otherwise, no launcher variables, config files and a tiny model config on disk."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from hf_zero.doctor import probes
from hf_zero.doctor.environment import TORCH_VARS
from hf_zero.launcher import multinode

GiB = 2**30
REAL_PROBES = {name: getattr(probes, name) for name in ("mem_available_bytes", "mem_total_bytes",
                                                       "memlock_limit_bytes")}
"""The real measurements, before the autouse fixture replaces them."""
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128, "dtype": "float32",
}


@pytest.fixture(autouse=True)
def machine(monkeypatch):
    """Pretend: no CUDA, 64 GiB MemAvailable and MemTotal, unlimited memlock, no RANK/WORLD_SIZE/... set.
    Tests change the returned dict's entries to craft another machine."""
    state = {"cuda": False, "devices": 0, "free": None, "available": 64 * GiB, "total": 64 * GiB, "memlock": None}
    monkeypatch.setattr(probes, "cuda_available", lambda: state["cuda"])
    monkeypatch.setattr(probes, "cuda_device_count", lambda: state["devices"])
    monkeypatch.setattr(probes, "cuda_free_bytes", lambda n: None if state["free"] is None else state["free"][:n])
    monkeypatch.setattr(probes, "mem_available_bytes", lambda: state["available"])
    monkeypatch.setattr(probes, "mem_total_bytes", lambda: state["total"])
    monkeypatch.setattr(probes, "memlock_limit_bytes", lambda: state["memlock"])
    monkeypatch.setattr("hf_zero.launcher.launch.cuda_device_count", lambda: state["devices"])
    for name in TORCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return state


@pytest.fixture
def write_config(tmp_path):
    """Write a config dict to tmp_path/NAME and return the path as a string."""

    def write(obj: dict, name: str = "zero.json") -> str:
        path = tmp_path / name
        path.write_text(json.dumps(obj))
        return str(path)

    return write


@pytest.fixture
def tiny_model(tmp_path) -> str:
    """A model directory holding the config.json of a ~100k-param Llama."""
    directory = tmp_path / "tiny_llama"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(directory)


@pytest.fixture
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def busy_port():
    """A port with a listening socket on 127.0.0.1 for the test's duration."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def by_name(results) -> dict:
    return {r.name: r for r in results}


DATA = Path(__file__).parent


@pytest.fixture
def started(monkeypatch):
    """Stub run_all: the command lists that would have been started."""
    calls = []
    monkeypatch.setattr(multinode, "run_all", lambda commands: calls.append(commands) or 0)
    return calls


@pytest.fixture
def script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("raise SystemExit('the script must not run')\n")
    return "train.py"
