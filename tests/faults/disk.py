"""A folder on a small disk, for tests of what a full disk does.

As root, a tmpfs of the given size is mounted on the folder: the kernel itself answers
``ENOSPC``. Where mounting is not allowed, the same limit is simulated inside the writing
process (``limit_writes``, which a rank function calls too): every file opened for writing
under the folder raises ``OSError(ENOSPC)`` once the folder's files would exceed the size, and
safetensors' ``save_file`` (a Rust writer that bypasses ``open``) writes through that ``open``.
``HF_ZERO_TEST_SIMULATED_DISK=1`` simulates even where mounting is allowed (to test that path).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import shutil
import subprocess


class SmallDisk:
    def __init__(self, path: str, size: int, mounted: bool) -> None:
        self.path, self.size, self.mounted = path, size, mounted
        self.undo = None

    def enter(self) -> None:
        """In the process that writes (a test's own, or a rank's): simulate the limit if no tmpfs."""
        if not self.mounted:
            self.undo = limit_writes(self.path, self.size)


@contextlib.contextmanager
def small_disk(path, size: int):
    path = str(path)
    os.makedirs(path, exist_ok=True)
    disk = None
    mounted = os.geteuid() == 0 and os.environ.get("HF_ZERO_TEST_SIMULATED_DISK") != "1" and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True).returncode == 0
    try:
        disk = SmallDisk(path, size, mounted)
        yield disk
    finally:
        if disk is not None and disk.undo is not None:
            disk.undo()
        if mounted:
            subprocess.run(["umount", "-l", path], check=False)


def _used(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files
               if os.path.isfile(os.path.join(d, f)))


class _Limited:
    """A file under the small folder: each write is flushed, so the folder's size is real."""

    def __init__(self, file, root: str, size: int) -> None:
        self._file, self._root, self._size = file, root, size

    def write(self, data) -> int:
        n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if _used(self._root) + n > self._size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = self._file.write(data)
        self._file.flush()
        return written

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
        return False


def limit_writes(root: str, size: int):
    """Patch ``open`` (and ``shutil.disk_usage``) in this process so that files under ``root``
    hold at most ``size`` bytes; returns the function that undoes it."""
    original, usage = io.open, shutil.disk_usage
    root = os.path.abspath(root)

    def limited_usage(path):
        if not os.path.abspath(os.fspath(path)).startswith(root):
            return usage(path)
        used = _used(root)
        return usage(path)._replace(total=size, used=used, free=max(0, size - used))

    def limited_open(file, mode="r", *args, **kwargs):
        f = original(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax+")
        under = isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)).startswith(root + os.sep)
        return _Limited(f, root, size) if writing and under else f

    import safetensors.torch
    import transformers.modeling_utils

    save_file = safetensors.torch.save_file

    def save_file_through_open(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with limited_open(filename, "wb") as f:
            f.write(data)

    builtins.open = io.open = limited_open
    shutil.disk_usage = limited_usage
    safetensors.torch.save_file = transformers.modeling_utils.safe_save_file = save_file_through_open

    def undo() -> None:
        builtins.open = io.open = original
        shutil.disk_usage = usage
        safetensors.torch.save_file = transformers.modeling_utils.safe_save_file = save_file

    return undo
