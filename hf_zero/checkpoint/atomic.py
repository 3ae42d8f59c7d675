"""Write beside, then swap: a new output never destroys the one it replaces until it is whole.

[Note: write beside, then swap]
``hf-zero consolidate`` and the Trainer's ``save_model`` (every stage) write into a folder that may
hold an earlier output (a re-run, a checkpoint saved again). Deleting the old files first and then
failing (a full disk, a crash) leaves neither. So every new file is written under a hidden
temporary name in the same folder (``.NAME.PID.hf_zero-tmp``: the same file system, so the
rename is atomic, and no loader globbing ``*.safetensors`` sees it); only once every new file is
complete are they renamed into place, one ``os.replace`` each, and only after that are the old
files that the new output does not have (numbered shards of another split, an index) removed.
Any failure before the swap removes the temporary files and leaves the old output as it was.
Where another writer picks the file names itself (``save_pretrained``: weights, config, tokenizer,
training arguments), ``StagedFolder`` gives it a hidden folder inside the output folder instead
(``.hf_zero-stage.HOST.PID.hf_zero-tmp``), whose files are renamed into place the same way; one
left behind by a killed save of this host is removed by the next one.

A full disk (``ENOSPC``, or ``EDQUOT`` for a quota) is reported as one ``DiskFullError`` naming
what was being written, the bytes the whole write needs and the bytes free, whatever layer hit
it (torch's zip writer, for one, turns it into ``RuntimeError: unexpected pos ...`` and keeps
the ``OSError`` only as the context; safetensors' writer raises ``SafetensorError`` whose message
ends in ``(os error 28)``).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import stat

import torch.distributed as dist

from hf_zero.engine.offload.nvme_files import pid_alive

TEMP_SUFFIX = ".hf_zero-tmp"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's io::Error ends its message (safetensors)
STAGE_PREFIX = ".hf_zero-stage."
# A weights file of save_pretrained's layouts: BASE.safetensors, BASE-00001-of-00002.safetensors, BASE.safetensors.index.json
_WEIGHTS = re.compile(r"(?P<base>.+?)(?:-\d+-of-\d+)?\.safetensors(?:\.index\.json)?")


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
        rust = _RUST_OS_ERROR.search(str(error)) if type(error).__module__.startswith("safetensors") else None
        if rust is not None and int(rust.group(1)) in _FULL:
            return OSError(int(rust.group(1)), os.strerror(int(rust.group(1))))
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


def _raise_disk_full(error: BaseException, path: str, needed: int | None) -> None:
    """Raise ``error`` again as a ``DiskFullError`` if a full disk caused it (a context manager's exit)."""
    if isinstance(error, Exception):
        full = as_disk_full(error, path, needed)
        if full is not None and full is not error:
            raise full from error


def raise_first_failure(failed: BaseException | None, output_dir: str, needed: int | None) -> None:
    """Every rank learns whether a writer failed (a collective where ranks exist) and raises the
    lowest failing writer's error: a full disk as ``DiskFullError``, anything else named."""
    if failed is not None:
        failed = as_disk_full(failed, output_dir, needed) or failed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if failed is not None:
            raise failed
        return
    mine = None
    if failed is not None:
        mine = failed if isinstance(failed, DiskFullError) else f"{type(failed).__name__}: {failed}"
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if failed is not None:
        raise failed
    for rank, theirs in enumerate(everyone):
        if isinstance(theirs, DiskFullError):
            raise theirs
        if theirs is not None:
            raise RuntimeError(f"rank {rank} failed writing the model to {output_dir}: {theirs}")


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
        _raise_disk_full(error, self.directory, self.needed)
        return False


def stale_weights(existing, written) -> list[str]:
    """The names of ``existing`` that a save writing ``written`` (file names of one folder)
    replaces: for every weights family it writes (``model``, ``adapter_model``), that family's
    single file, numbered shards and index that it does not write. ``save_pretrained`` removes
    the numbered ones; the single file or index of the other layout goes too, since loaders would
    read it first."""
    written = set(written)
    families = {m.group("base") for name in written if (m := _WEIGHTS.fullmatch(name))}
    return sorted(name for name in existing if name not in written
                  and (m := _WEIGHTS.fullmatch(name)) is not None and m.group("base") in families)


class StagedFolder:
    """A whole output that another writer lays out itself (``save_pretrained``), written into a
    hidden folder inside ``directory`` and swapped in once whole ([Note: write beside, then swap]).

    ``path``: where to write; ``commit()`` renames every file written there into place (its
    sub-folders too), removes the weights files it replaces (``stale_weights``), then the hidden
    folder. As a context manager: the hidden folder is removed on any error, a full disk raised
    as ``DiskFullError`` naming ``directory`` (``needed``: the bytes the output needs).
    """

    def __init__(self, directory: str, needed: int | None = None) -> None:
        self.directory, self.needed = directory, needed
        self.path = os.path.join(directory, f"{STAGE_PREFIX}{socket.gethostname()}.{os.getpid()}{TEMP_SUFFIX}")

    def commit(self) -> list[str]:
        """Rename every staged file into place, then remove the replaced weights; returns the
        final paths of the top-level files."""
        final = []
        for root, _, files in os.walk(self.path):
            rel = os.path.relpath(root, self.path)
            target = self.directory if rel == "." else os.path.join(self.directory, rel)
            os.makedirs(target, exist_ok=True)
            for name in sorted(files):
                os.replace(os.path.join(root, name), os.path.join(target, name))
                if rel == ".":
                    final.append(os.path.join(target, name))
        for name in stale_weights(os.listdir(self.directory), [os.path.basename(f) for f in final]):
            os.unlink(os.path.join(self.directory, name))
        shutil.rmtree(self.path)
        return final

    def __enter__(self) -> "StagedFolder":
        os.makedirs(self.directory, exist_ok=True)
        _remove_dead_stages(self.directory)
        if os.path.lexists(self.path):  # this very process, cut short before (an earlier error)
            shutil.rmtree(self.path)
        os.mkdir(self.path)
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if error is None:
            return False
        if os.path.isdir(self.path) and not os.path.islink(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
        _raise_disk_full(error, self.directory, self.needed)
        return False


def _remove_dead_stages(directory: str) -> None:
    """Hidden stage folders of this host's saves that were killed (their process is gone): only
    real folders (no link followed) owned by this user, named as ``StagedFolder`` names them."""
    host = socket.gethostname()
    for name in os.listdir(directory):
        if not (name.startswith(f"{STAGE_PREFIX}{host}.") and name.endswith(TEMP_SUFFIX)):
            continue
        pid = name[len(f"{STAGE_PREFIX}{host}."):-len(TEMP_SUFFIX)]
        path = os.path.join(directory, name)
        st = os.lstat(path)
        if not pid.isdigit() or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or pid_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)

