"""Remote exports, env files, and running commands in parallel with signal forwarding."""

import os
import signal
import sys
import threading
import time

import pytest

from hf_zero.launcher.commands import NodeCommand
from hf_zero.launcher.multinode import env_file_paths, parse_env_file, remote_exports, run_all


def test_parse_env_file():
    text = "# comment\n\nNCCL_IB_DISABLE=1\n  OPTS = a=b c \nFROM_SHELL\nEMPTY=\n"
    assert parse_env_file(text, "f", {"FROM_SHELL": "shell value"}) == {
        "NCCL_IB_DISABLE": "1",
        "OPTS": " a=b c",
        "FROM_SHELL": "shell value",
        "EMPTY": "",
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("A=1\nexport B=2\n", "f:2: expected NAME=VALUE or NAME, got 'export B=2'"),
        ("1A=2\n", "f:1: expected NAME=VALUE or NAME, got '1A=2'"),
        ("UNSET_NAME\n", "f:1: UNSET_NAME is not set in this shell; set it, or write UNSET_NAME=VALUE"),
    ],
)
def test_env_file_errors(text, message):
    with pytest.raises(ValueError) as caught:
        parse_env_file(text, "f", {})
    assert str(caught.value) == message


def test_remote_exports(tmp_path):
    home_file, job_file = tmp_path / "home_env", tmp_path / "job_env"
    home_file.write_text("A=home\nB=home\n")
    job_file.write_text("B=job\n")
    environ = {"NCCL_DEBUG": "INFO", "HF_HOME": "/hf", "PYTHONPATH": "/lib", "TORCH_X": "1",
               "TRANSFORMERS_CACHE": "/c", "CUDA_HOME": "/cuda", "PYTHONUNBUFFERED": "1",
               "HOME": "/home/me", "SECRET": "no"}  # fmt: skip
    exports = remote_exports(environ, "/job", [str(home_file), str(job_file), str(tmp_path / "absent")])
    assert exports == {
        "CUDA_HOME": "/cuda", "HF_HOME": "/hf", "NCCL_DEBUG": "INFO", "PYTHONPATH": "/job:/lib",
        "PYTHONUNBUFFERED": "1", "TORCH_X": "1", "TRANSFORMERS_CACHE": "/c", "A": "home", "B": "job",
    }  # fmt: skip
    assert remote_exports({}, "/job", [])["PYTHONPATH"] == "/job"


def test_env_file_paths():
    assert env_file_paths("/home/me", "/job") == ["/home/me/.hf_zero_env", "/job/.hf_zero_env"]
    assert env_file_paths("/home/me", "/home/me") == ["/home/me/.hf_zero_env"]


def python(code: str) -> NodeCommand:
    return NodeCommand(host="localhost", argv=(sys.executable, "-c", code), env={})


def test_all_succeed_and_env_is_added():
    code = "import os, sys; sys.exit(0 if os.environ['HF_ZERO_T'] == 'yes' else 9)"
    command = NodeCommand(host="h", argv=(sys.executable, "-c", code), env={"HF_ZERO_T": "yes"})
    assert run_all([command, python("pass")]) == 0


def test_first_failure_stops_the_others(tmp_path):
    pid_file = tmp_path / "pid"
    sleeper = python(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    failing = python("import time, sys; time.sleep(0.5); sys.exit(3)")
    start = time.monotonic()
    assert run_all([sleeper, failing]) == 3
    assert time.monotonic() - start < 15
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_killed_child_gives_128_plus_signal():
    assert run_all([python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")]) == 128 + 9


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 7), (signal.SIGINT, 5)])
def test_signals_are_forwarded(tmp_path, signum, code):
    ready = tmp_path / "ready"
    child = python(
        "import pathlib, signal, sys, time\n"
        f"signal.signal({int(signum)}, lambda *a: sys.exit({code}))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )

    def send_when_ready():
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    before = signal.getsignal(signum)
    threading.Thread(target=send_when_ready, daemon=True).start()
    assert run_all([child]) == code
    assert signal.getsignal(signum) is before
