"""Why a rank failed, told to its launcher: torch elastic's error file (`TORCHELASTIC_ERROR_FILE`).

torchrun gives every rank the path of a JSON file in `TORCHELASTIC_ERROR_FILE`. A rank that writes
it before exiting has its message shown in torchrun's `ChildFailedError` table instead of "To
enable traceback see: ...", and torchrun, when its own `TORCHELASTIC_ERROR_FILE` is set, copies
the file of the first failure (the earliest timestamp) there (torch's `@record` on its `main`).
`hf-zero launch` sets that path for the torchrun it starts and prints the message as one line
after torchrun's table: `hf_zero: job failed: rank 1 raised CheckpointError: ...`.

Writers, each with one line that names the rank and the cause:
- `python -m hf_zero.run`, for an exception out of the script (`rank 1 raised <Type>: <message>`),
  before it tells the other ranks' watchdogs;
- the watchdog, for a rank it ends with `os._exit` (no exception for torch's `@record` to catch):
  the job's headline (`rank 1 raised ...`, `stalled: rank 1 has been in ...`, `collective
  timeout: ...`) stamped with the time of the cause, so a rank stopped because another raised is
  never earlier than the raise.

Format: torch's `ErrorHandler.record_exception` without `py_callstack` (each rank prints its own
traceback; torchrun's table then shows the one line): `{"message": {"message": TEXT, "extraInfo":
{"timestamp": "SECONDS"}}}`. Written to a temporary name and renamed, so two writers of one path
never leave half a file. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import time

ENV = "TORCHELASTIC_ERROR_FILE"


def write(message: str, *, timestamp: float | None = None) -> None:
    """Record `message` in this process's error file; nothing without `TORCHELASTIC_ERROR_FILE`.

    A record already there that is as old or older is kept: the cause comes first (a rank whose
    watchdog is stopping the job for another rank's raise may raise itself when that rank leaves;
    its own exception is a consequence). Never raises: the failure being recorded must come out."""
    path = os.environ.get(ENV)
    if not path:
        return
    when = time.time() if timestamp is None else timestamp
    earlier = _timestamp(path)
    if earlier is not None and earlier <= int(when):
        return
    data = {"message": {"message": message, "extraInfo": {"timestamp": str(int(when))}}}
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temp, "w", encoding="utf-8") as file:
            json.dump(data, file)
        os.replace(temp, path)
    except OSError:
        try:
            os.unlink(temp)
        except OSError:
            pass


# What a rank's collective raises when a peer process went away (gloo; NCCL's remote-exit error):
# the rank reporting it is a consequence of the peer's failure, not its cause.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def stamp_for(error: BaseException) -> float:
    """The time to record ``error`` at. A peer-lost collective error (``PEER_LOST``) is dated one
    second late: torchrun's timestamps are whole seconds and it breaks a tie by the lower rank, so
    rank 0 noticing rank 1's exit in the same second as rank 1's raise would otherwise become the
    job's root cause (a rank that raised on its own is never dated late)."""
    late = any(marker in str(error) for marker in PEER_LOST)
    return time.time() + (1.0 if late else 0.0)


def raised(rank: int | str, error: BaseException) -> str:
    """The line for an exception: `rank 1 raised CheckpointError: <message>`."""
    text = str(error).strip()
    return f"rank {rank} raised {type(error).__name__}" + (f": {text}" if text else "")


def _timestamp(path: str) -> int | None:
    """The seconds of the record in `path`, or None (no file, or not one of these)."""
    try:
        with open(path, encoding="utf-8") as file:
            return int(json.load(file)["message"]["extraInfo"]["timestamp"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read(path: str) -> str | None:
    """The message of an error file torchrun wrote or copied, or None (no file, not one of these)."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, dict):  # torch's ErrorHandler format
        message = message.get("message")
    return message.strip() or None if isinstance(message, str) else None
