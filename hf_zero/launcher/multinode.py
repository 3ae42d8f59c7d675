"""Running node commands: the environment remote nodes get, and parallel execution.

A command started over ssh sees the remote login environment, not ours, so the ssh
launcher exports (in this order, later wins):
1. every variable whose name starts with one of `EXPORT_PREFIXES`;
2. PYTHONPATH = the launch directory, then our PYTHONPATH (scripts import local modules);
3. the assignments in `~/.hf_zero_env`, then `./.hf_zero_env` (DeepSpeed's `.deepspeed_env`
   format: `NAME=VALUE` lines, `#` comments; a bare `NAME` exports our value of NAME).

`run_all` runs commands side by side, each in its own session, forwarding SIGINT/SIGTERM
to them; the first one to fail stops the others, and its exit code is returned.
"""

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

from hf_zero.launcher.commands import NodeCommand

EXPORT_PREFIXES = ("NCCL_", "PYTHON", "CUDA_", "HF_", "TRANSFORMERS_", "TORCH_")
ENV_FILE_NAME = ".hf_zero_env"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def env_file_paths(home: str, cwd: str) -> list[str]:
    """`~/.hf_zero_env` then `./.hf_zero_env` (once if they are the same file)."""
    paths = [os.path.join(home, ENV_FILE_NAME), os.path.join(cwd, ENV_FILE_NAME)]
    return paths[:1] if os.path.abspath(paths[0]) == os.path.abspath(paths[1]) else paths


def parse_env_file(text: str, name: str, environ: Mapping[str, str]) -> dict[str, str]:
    """`NAME=VALUE` and bare `NAME` lines -> {NAME: VALUE}; `name` is only for messages."""
    result: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, has_value, value = line.partition("=")
        key = key.strip()
        if not _NAME.match(key):
            raise ValueError(f"{name}:{lineno}: expected NAME=VALUE or NAME, got {line!r}")
        if not has_value:
            if key not in environ:
                raise ValueError(
                    f"{name}:{lineno}: {key} is not set in this shell; set it, or write {key}=VALUE"
                )
            value = environ[key]
        result[key] = value
    return result


def remote_exports(
    environ: Mapping[str, str], cwd: str, env_files: Iterable[str]
) -> dict[str, str]:
    """The variables exported to every ssh node (see the module docstring)."""
    exports = {name: environ[name] for name in sorted(environ) if name.startswith(EXPORT_PREFIXES)}
    python_path = environ.get("PYTHONPATH")
    exports["PYTHONPATH"] = cwd + (os.pathsep + python_path if python_path else "")
    for path in env_files:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                exports.update(parse_env_file(file.read(), path, environ))
    return exports


def _exit_code(returncode: int) -> int:
    """A shell-style exit code: a child killed by signal N gives 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _stop(processes: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every running process, then SIGKILL its whole session after `grace_s`."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def run_all(
    node_commands: Sequence[NodeCommand], *, grace_s: float = 30.0, poll_s: float = 0.1
) -> int:
    """Run the commands in parallel; 0 if all succeed, else the first failure's exit code.

    SIGINT/SIGTERM sent to this process are forwarded to every command still running (each
    runs in its own session, so a terminal's Ctrl-C reaches it exactly once, through us).
    """
    processes: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        for command in node_commands:
            env = {**os.environ, **command.env}
            stdin = subprocess.DEVNULL if command.stdin_closed else None
            processes.append(
                subprocess.Popen(command.argv, env=env, stdin=stdin, start_new_session=True)
            )
        while True:
            codes = [process.poll() for process in processes]
            failed = next((code for code in codes if code not in (None, 0)), None)
            if failed is not None:
                return _exit_code(failed)
            if all(code == 0 for code in codes):
                return 0
            time.sleep(poll_s)
    finally:
        _stop(processes, grace_s)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
