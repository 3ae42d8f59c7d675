"""Write beside, then swap: a new output never destroys the one it replaces until it is whole.

[Note: write beside, then swap]
``hf-zero consolidate`` and the stage-3 streamed ``save_model`` write into a folder that may hold
an earlier output (a re-run, a checkpoint saved again). Deleting the old files first and then
failing (a full disk, a crash) leaves neither. So every new file is written under a hidden
temporary name in the same folder (``.NAME.PID.hf_zero-tmp``: the same file system, so the
rename is atomic, and no loader globbing ``*.safetensors`` sees it); only once every new file is
complete are they renamed into place, one ``os.replace`` each, and only after that are the old
files that the new output does not have (numbered shards of another split, an index) removed.
Any failure before the swap removes the temporary files and leaves the old output as it was.

A full disk (``ENOSPC``, or ``EDQUOT`` for a quota) is reported as one ``DiskFullError`` naming
what was being written, the bytes the whole write needs and the bytes free, whatever layer hit
it (torch's zip writer, for one, turns it into ``RuntimeError: unexpected pos ...`` and keeps
the ``OSError`` only as the context).
"""

from __future__ import annotations

import errno
import os
import shutil

TEMP_SUFFIX = ".hf_zero-tmp"
_FULL = (errno.ENOSPC, errno.EDQUOT)


def temp_path(directory: str, name: str) -> str:
    """The hidden temporary path beside ``directory/name`` that a new ``name`` is written to."""
    return os.path.join(directory, f".{name}.{os.getpid()}{TEMP_SUFFIX}")


class DiskFullError(OSError):
    """No space left (or the quota is used up) while writing ``path``; an ``OSError`` with the
    original errno, so code that handles ``OSError`` still does."""

    def __init__(self, path: str, needed: int | None, free: int | None, code: int = errno.ENOSPC) -> None:
        self.path, self.needed, self.free, self.code = path, needed, free, code
        what = "No space left on device" if code == errno.ENOSPC else "Disk quota exceeded"
        sizes = f"{'?' if needed is None else needed} bytes needed, {'?' if free is None else free} free"
        self.message = f"{what} writing {path} ({sizes})"
        super().__init__(code, self.message)  # errno and strerror, as for any OSError

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # torch.distributed.checkpoint pickles a rank's error to the others
        return (type(self), (self.path, self.needed, self.free, self.code))


def disk_full_cause(error: BaseException | None) -> OSError | None:
    """The ``ENOSPC``/``EDQUOT`` ``OSError`` that ``error`` is, or was raised from or while
    handling (``__cause__``/``__context__``), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL:
            return error
        error = error.__cause__ or error.__context__
    return None


def free_bytes(path: str) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def as_disk_full(error: BaseException, path: str, needed: int | None) -> DiskFullError | None:
    """``error`` as a ``DiskFullError`` for a write of ``needed`` bytes to ``path``, if a full
    disk caused it; else None. Call after removing partial files, so the free bytes are real."""
    if isinstance(error, DiskFullError):
        return error
    cause = disk_full_cause(error)
    if cause is None:
        return None
    return DiskFullError(path, needed, free_bytes(path), cause.errno)


class Swap:
    """New files of one folder, written beside the old ones and swapped in together
    ([Note: write beside, then swap]).

    ``temp(name)`` gives the hidden path to write ``name`` to; ``commit(stale)`` renames every
    written file into place, then removes the ``stale`` names the new output does not have;
    ``abort()`` removes the temporary files. As a context manager: ``abort()`` on any error, and
    a full disk raised as ``DiskFullError`` (``needed``: the bytes the whole write needs).
    """

    def __init__(self, directory: str, needed: int | None = None) -> None:
        self.directory, self.needed = directory, needed
        self._temps: dict[str, str] = {}  # final name -> temporary path, in the order asked for

    def temp(self, name: str) -> str:
        if os.sep in name or name.startswith("."):
            raise AssertionError(f"Swap.temp({name!r}): a plain file name of {self.directory} is expected")
        path = temp_path(self.directory, name)
        self._temps[name] = path
        return path

    def commit(self, stale=()) -> list[str]:
        """Rename every new file into place, then remove the ``stale`` names not among them;
        returns the final paths."""
        for name, temp in self._temps.items():
            if not os.path.isfile(temp):
                raise AssertionError(f"{temp} was never written: {name} cannot be swapped in")
        final = []
        for name, temp in self._temps.items():
            os.replace(temp, os.path.join(self.directory, name))
            final.append(os.path.join(self.directory, name))
        for name in stale:
            path = os.path.join(self.directory, name)
            if name not in self._temps and os.path.isfile(path):
                os.unlink(path)
        self._temps.clear()
        return final

    def abort(self) -> None:
        for temp in self._temps.values():
            if os.path.exists(temp):
                os.unlink(temp)
        self._temps.clear()

    def __enter__(self) -> "Swap":
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if error is None:
            return False
        self.abort()
        if isinstance(error, Exception):
            full = as_disk_full(error, self.directory, self.needed)
            if full is not None and full is not error:
                raise full from error
        return False
