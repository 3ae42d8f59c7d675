"""read_small_text: the text of a small regular file, refusing anything that could be unbounded.

A path the user gives (``--zero_config``, ``check-config FILE``, ``activate(path)``, a hostfile, a
model's config.json) can name anything. ``/dev/zero`` reads forever, a FIFO blocks ``open()``
until a writer comes, and a multi-GB file would be read whole before the JSON parser could
complain. So the file is opened without blocking, checked with ``fstat`` (a regular file only)
and read up to a cap: a config written by hand is a few KiB, and 1 MiB leaves room for any
generated one.
"""

from __future__ import annotations

import os
import stat

from hf_zero.config.errors import ConfigError

MAX_BYTES = 1 << 20
"""Largest config-like file read (1 MiB)."""

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (``a directory``, ``a FIFO (named pipe)``, ...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_small_text(path: str | os.PathLike[str], *, what: str = "config file", limit: int = MAX_BYTES,
                    error: type[ValueError] = ConfigError) -> str:
    """The UTF-8 text of the regular file ``path``, at most ``limit`` bytes.

    Raises ``error`` (a ValueError subclass) naming ``what``, the path, and, for a file that is too
    large, its size and the cap; for anything but a regular file, what it is. The check is made on
    the opened descriptor, so a path swapped between check and read cannot get past it.
    """
    name = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO opens at once
    except FileNotFoundError:
        raise error(f"{what} not found: {name}") from None
    except (OSError, ValueError) as err:  # ValueError: NUL in the path
        raise error(f"cannot read {what} {name}: {err}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"cannot read {what} {name}: it is {file_kind(info.st_mode)}, not a regular file; "
                        "allowed: a regular file")
        if info.st_size > limit:
            raise error(_too_large(what, name, f"{info.st_size} bytes", limit))
        data = _read_up_to(fd, limit + 1)  # the size can change after fstat: never read past the cap
    except OSError as err:
        raise error(f"cannot read {what} {name}: {err}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(_too_large(what, name, f"more than {limit} bytes", limit))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"cannot read {what} {name}: not UTF-8 text ({err})") from None


def _read_up_to(fd: int, count: int) -> bytes:
    """Up to ``count`` bytes from ``fd``, fewer only where the file ends."""
    parts, left = [], count
    while left > 0:
        part = os.read(fd, min(left, 1 << 16))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _too_large(what: str, name: str, size: str, limit: int) -> str:
    return f"{what} {name} is too large: {size}; allowed: at most {limit} bytes ({limit / 2**20:g} MiB)"
