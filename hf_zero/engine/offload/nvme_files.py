"""The swap directory of the NVMe tier: its checks, its name, its files and their block I/O.

Each rank that offloads optimizer state to NVMe owns one directory under ``nvme_path``::

    nvme_path/hf_zero-swap-<host>-<pid>-rank<r>-<n>/   (n: the process's n-th swap, from 0)
        master.swap            fp32 master shards of the offloaded buckets
        state.exp_avg.swap     one file per per-element optimizer state tensor (AdamW: two), in the
        state.exp_avg_sq.swap  state's dtype (fp32, or bf16: [Note: bf16 host state] in state_dtype.py)

Nothing else is ever created there, and nothing else is ever removed: ``remove_stale`` deletes only
regular files of these names, owned by this user, inside real directories (never through a
symlink) of this naming, owned by this user, whose process (same host, that pid) is gone (a crashed
run), then the directory if it is empty; ``SwapDir.remove`` does the same for this run's
own directory at ``close()``, and a finalizer when it is collected or the interpreter exits.

Transfers go through ``os.preadv``/``os.pwrite`` (they release the GIL) in requests of
``REQUEST_BYTES``, at file offsets and lengths that are multiples of ``BLOCK_BYTES``; a thread
pool runs them, so one transfer keeps several requests in flight.

[Note: direct I/O] A ``SwapDir`` made with ``direct=True`` (the optimizer tier, nvme_swap.py) moves
its blocks through a second descriptor of each file opened with O_DIRECT: the bytes go between the
drive and our buffers, not through the page cache, so what a step measures is the drive, and the
files' pages do not crowd the host's memory. O_DIRECT needs the buffer's address, the file offset
and the length to be multiples of the device's logical block (``PAGE_BYTES`` covers every common
one): offsets and lengths are multiples of ``BLOCK_BYTES`` already, and the buffers come from
``page_aligned``. ``direct_io_problem`` tries it (a real aligned write and read of a probe file)
before any swap file is made; where the file system refuses (an old tmpfs, some network and
FUSE file systems: EINVAL), the tier says so once (``use_direct_io``) and goes through the page
cache. The files' shared mappings (``SwapFile.view``, read outside the step) stay coherent: the
kernel writes a range's dirty pages back before a direct read of it, and drops its cached pages
after a direct write. ``torch.cuda.gds`` (GPUDirect Storage) moves bytes between files and *GPU*
memory; the optimizer tier's state is stepped on the CPU, so it has no use for it.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import shutil
import socket
import stat
import tempfile
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from hf_zero.config.errors import ConfigError
from hf_zero.first_rank import is_first_rank

KEY = "zero_optimization.offload_optimizer.nvme_path"
PREFIX = "hf_zero-swap"
SUFFIX = ".swap"
BLOCK_BYTES = 1 << 20  # file offsets and transfer lengths are multiples of this (DeepSpeed's aio block_size)
REQUEST_BYTES = 8 << 20  # one pread/pwrite; a chunk's transfer is split into these
IO_THREADS = 4  # requests in flight at once, per rank
PAGE_BYTES = 4096  # O_DIRECT: buffer addresses are multiples of this ([Note: direct I/O])
_NAME = re.compile(rf"^{PREFIX}-(?P<host>.+)-(?P<pid>\d+)-rank(?P<rank>\d+)-(?P<serial>\d+)$")
_FILE = re.compile(r"^(master|state\.[A-Za-z0-9_]+|param\.\d+)\.swap$")  # the names SwapDir.file gives
_serial = 0


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def directory_problem(path: str) -> str | None:
    """Why ``path`` cannot hold swap files (missing, not a directory, not writable), or None."""
    if not os.path.exists(path):
        return f"the directory does not exist (create it: mkdir -p {path})"
    if not os.path.isdir(path):
        return "not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{PREFIX}-probe-", dir=path)
    except OSError as error:
        return f"the directory is not writable: {error.strerror or error}"
    os.close(fd)
    os.remove(probe)
    return None


def free_bytes(path: str) -> int:
    """Free bytes on the file system of ``path`` (``shutil.disk_usage``; tests replace it)."""
    return shutil.disk_usage(path).free


def open_direct(path: str) -> int:
    """A read-write descriptor of the existing file ``path`` that bypasses the page cache (O_DIRECT)."""
    return os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)


def direct_io_problem(directory: str) -> str | None:
    """Why the file system of ``directory`` cannot do O_DIRECT transfers, or None: a probe file is
    opened with O_DIRECT, written and read back a page from page-aligned memory, then removed."""
    fd, probe = tempfile.mkstemp(prefix=f".{PREFIX}-direct-", dir=directory)
    os.close(fd)
    page = mmap.mmap(-1, PAGE_BYTES)  # anonymous mappings start at a page boundary
    try:
        page[:8] = b"hf_zero!"
        fd = open_direct(probe)
        try:
            if os.pwrite(fd, page, 0) != PAGE_BYTES or os.preadv(fd, [page], 0) != PAGE_BYTES or page[:8] != b"hf_zero!":
                return "a direct write and read of one page did not round-trip"
        finally:
            os.close(fd)
    except OSError as error:
        name = errno.errorcode.get(error.errno, str(error.errno))
        return f"O_DIRECT refused: {error.strerror or error} ({name})"
    finally:
        page.close()
        os.remove(probe)
    return None


_said_direct: set[str] = set()  # directories whose fallback was said in this process


def use_direct_io(path: str, key: str = KEY) -> bool:
    """Whether swap files in ``path`` move their blocks with O_DIRECT ([Note: direct I/O]). Where the
    file system refuses, a warning says so (once per directory, from the job's first rank) and the
    transfers go through the page cache."""
    problem = direct_io_problem(path)
    if problem is not None and path not in _said_direct:
        _said_direct.add(path)
        if is_first_rank():
            warnings.warn(f'{key} = "{path}": {problem}; the NVMe tier reads and writes its swap files through '
                          "the page cache there, so its speed is partly the page cache's and the files' pages "
                          "take host memory the kernel can reclaim (a directory on a local NVMe drive "
                          "with ext4 or xfs takes O_DIRECT)", UserWarning, stacklevel=3)
    return problem is None


def page_aligned(memory, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``numel`` elements of ``dtype`` from ``memory`` (``HostMemory``) starting at a ``PAGE_BYTES``
    boundary: O_DIRECT's rule for buffer addresses ([Note: direct I/O]). Costs at most one page more."""
    size = dtype.itemsize
    out = memory.empty(numel + PAGE_BYTES // size, dtype)
    skip = (-out.data_ptr() % PAGE_BYTES) // size
    return out[skip : skip + numel]


PARAM_KEY = "zero_optimization.offload_param.nvme_path"


def nvme_error(path: str, problem: str, allowed: str = "an existing, writable directory, on a local NVMe drive "
                                                           "for speed", key: str = KEY) -> ConfigError:
    return ConfigError(problem, key=key, value=path, allowed=allowed)


def check_directory(path: str, needed: int, kinds: int, ctx, *, what: str | None = None,
                    key: str = KEY, less: str = "offload less (offload_optimizer.ratio)") -> None:
    """Before any file is made: ``path`` exists, is writable, and has room for the swap files of
    every rank of this host that uses it. Ranks agree first, so all raise or none does.
    ``what``: the swap files, as the error names them (default: the optimizer's, ``kinds``)."""
    problem = directory_problem(path)
    device, free = None, 0
    if problem is None:
        remove_stale(path)  # a crashed run's files: their room is ours again
        device, free = os.stat(path).st_dev, free_bytes(path)
    mine = (problem, host_name(), device, needed)
    everyone = [mine]
    if ctx is not None and ctx.world_size > 1:
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, mine, group=ctx.group)
    if problem is not None:
        raise nvme_error(path, problem, key=key)
    others = [(r, p) for r, (p, *_) in enumerate(everyone) if p is not None]
    if others:
        r, p = others[0]
        raise nvme_error(path, f"rank {r} cannot use it: {p}", key=key)
    sharing = [n for (_, host, dev, n) in everyone if (host, dev) == (mine[1], device)]
    total = sum(sharing)
    if total > free:
        from hf_zero.byte_units import fmt_bytes

        what = what or f"optimizer swap files (fp32 masters and {kinds - 1} optimizer state tensors per element)"
        raise nvme_error(
            path,
            f"{fmt_bytes(free)} free, {fmt_bytes(total)} needed for the {what} of {len(sharing)} "
            f"rank(s) on this host ({fmt_bytes(needed)} per rank)",
            allowed=f"a directory with at least {fmt_bytes(total)} free; or {less}, or use more ranks",
            key=key,
        )


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts: it cannot be signalled, but it is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove_ours(directory: str) -> None:
    """Remove our swap files in ``directory``, then the directory if nothing else is left.

    Ours: regular files (``lstat``: a symlink is never followed, a subdirectory never entered) named
    as ``SwapDir.file`` names them (``_FILE``) and owned by this user. The directory is opened
    with O_NOFOLLOW and every name is looked up relative to that descriptor, so a directory swapped
    for a link meanwhile cannot redirect the removals elsewhere."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # gone, or a link / not a directory: nothing of ours
    try:
        for name in os.listdir(fd):
            if _FILE.match(name) is None:
                continue
            try:
                info = os.lstat(name, dir_fd=fd)
                if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid():
                    os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass  # another rank of this host removed it first
    finally:
        os.close(fd)
    try:
        os.rmdir(directory)
    except OSError:
        pass  # gone already, or holds files we did not create: they stay


def remove_stale(path: str) -> list[str]:
    """Remove the swap files of dead runs of this host in ``path``; returns the directories seen as stale.

    Stale: a real directory (not a link to one) named like ours, of this host, owned by this user,
    whose process is gone. Only our own files in it are removed (``_remove_ours``)."""
    host, stale = host_name(), []
    for name in os.listdir(path):
        match = _NAME.match(name)
        if match is None or match["host"] != host:
            continue
        full = os.path.join(path, name)
        try:
            info = os.lstat(full)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        _remove_ours(full)
        stale.append(full)
    return stale


class SwapFile:
    """One swap file: a descriptor for block transfers (``io_fd``: O_DIRECT where ``direct``) and a
    shared mapping of the whole file (``view``).

    The mapping is what code outside the optimizer step sees (checkpoints, ``optimizer.state``): on
    Linux it is coherent with ``pread``/``pwrite`` through the page cache (and with direct transfers:
    [Note: direct I/O]), and its pages are file pages the kernel can drop. Pages the process touched
    through it count in its RSS until ``drop_pages``. Its elements are ``dtype``'s (the view's too)."""

    def __init__(self, path: str, numel: int, direct: bool = False, dtype: torch.dtype = torch.float32) -> None:
        self.path, self.dtype, self.nbytes = path, dtype, numel * dtype.itemsize
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, self.nbytes)  # sparse: the disk fills as the first step writes
        self.io_fd = open_direct(path) if direct else self.fd
        self.direct = direct
        # Ours, not torch.from_file's, so that drop_pages can madvise it; tensors viewing it keep it alive.
        self._map = mmap.mmap(self.fd, self.nbytes) if self.nbytes else None
        self.view = torch.frombuffer(self._map, dtype=dtype) if self._map is not None else torch.empty(0, dtype=dtype)

    def drop_pages(self) -> None:
        """Unmap the pages this process touched through ``view`` (MADV_DONTNEED): its RSS lets go of
        them. Nothing is lost: for a shared file mapping the next access reads the file's current
        contents, dirty pages included (they stay in the page cache until written back)."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)

    def write_back(self) -> None:
        """Write what was written through ``view`` to the disk and let go of the file's pages: this
        process's RSS (``drop_pages``) and the page cache (``fdatasync``, then ``POSIX_FADV_DONTNEED``,
        which drops clean pages only). For a file filled through its mapping at construction
        ([Note: shards written back] in nvme_params.py); the next read comes from the disk."""
        self.drop_pages()
        if self.nbytes:
            os.fdatasync(self.fd)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.io_fd != self.fd:
            os.close(self.io_fd)
        os.close(self.fd)


class SwapDir:
    """This rank's swap directory, its files, and the thread pool that moves their blocks."""

    def __init__(self, path: str, rank: int, direct: bool = False) -> None:
        global _serial
        self.path = os.path.join(path, f"{PREFIX}-{host_name()}-{os.getpid()}-rank{rank}-{_serial}")
        _serial += 1
        os.mkdir(self.path, 0o700)
        self.direct = direct  # [Note: direct I/O]: every file's blocks move with O_DIRECT
        self.files: dict[str, SwapFile] = {}
        self._pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="hf_zero-nvme")
        # Runs once: at remove(), when this object is collected, or at interpreter exit (atexit).
        self._finalizer = weakref.finalize(self, _remove_dir, self._pool, self.files, self.path)

    def file(self, kind: str, numel: int, dtype: torch.dtype = torch.float32) -> SwapFile:
        """The file of ``kind`` ("master", a state key, or "param.<n>": a parameter shard of the
        NVMe parameter tier, nvme_params.py), ``numel`` elements of ``dtype``, created on first use."""
        if kind not in self.files:
            safe = re.sub(r"[^A-Za-z0-9_]", "_", kind)
            name = kind if kind == "master" or kind.startswith("param.") else f"state.{safe}"
            self.files[kind] = SwapFile(os.path.join(self.path, name + SUFFIX), numel, self.direct, dtype)
        return self.files[kind]

    def read(self, kind: str, into: torch.Tensor, offset_numel: int) -> list[Future]:
        """Start reading ``into.numel()`` elements of ``kind`` (in its dtype) at element ``offset_numel``."""
        return self._transfer(self.files[kind], into, self._at(kind, into, offset_numel), write=False)

    def write(self, kind: str, source: torch.Tensor, offset_numel: int) -> list[Future]:
        """Start writing ``source`` (in the file's dtype) into ``kind`` at element ``offset_numel``."""
        return self._transfer(self.files[kind], source, self._at(kind, source, offset_numel), write=True)

    def _at(self, kind: str, buffer: torch.Tensor, offset_numel: int) -> int:
        """The byte offset of element ``offset_numel`` of ``kind``'s file, ``buffer`` checked to be of its dtype."""
        dtype = self.files[kind].dtype
        if buffer.dtype != dtype:
            raise AssertionError(f"swap transfer of {buffer.dtype} elements for the {dtype} file {kind!r}")
        return offset_numel * dtype.itemsize

    def read_file(self, file: SwapFile, into: torch.Tensor, offset: int) -> list[Future]:
        """Start reading ``into``'s bytes (whole blocks) of ``file`` at byte ``offset`` (nvme_staging.py)."""
        return self._transfer(file, into, offset, write=False)

    def _transfer(self, file: SwapFile, buffer: torch.Tensor, start: int, *, write: bool) -> list[Future]:
        nbytes = buffer.numel() * buffer.element_size()
        if start % BLOCK_BYTES or nbytes % BLOCK_BYTES:
            raise AssertionError(f"swap transfer of {nbytes} bytes at {start} is not in {BLOCK_BYTES}-byte blocks")
        if file.direct and buffer.data_ptr() % PAGE_BYTES:
            raise AssertionError(f"direct swap transfer from address {buffer.data_ptr():#x}: not page-aligned")
        memory = memoryview(buffer.view(torch.uint8).numpy())
        io = _pwrite if write else _pread
        return [self._pool.submit(io, file.io_fd, memory[at : at + REQUEST_BYTES], start + at, self.path)
                for at in range(0, nbytes, REQUEST_BYTES)]

    def remove(self) -> None:
        """Stop the pool (after the transfers in flight), close and delete our files and directory.
        Idempotent. Views of the files stay readable until dropped (an unlinked file lives on)."""
        self._finalizer()

    def disk_bytes(self) -> int:
        """Bytes the files take on disk now (sparse files count only what was written)."""
        return sum(os.fstat(f.fd).st_blocks * 512 for f in self.files.values())


def _remove_dir(pool: ThreadPoolExecutor, files: dict[str, SwapFile], path: str) -> None:
    pool.shutdown(wait=True)
    for file in files.values():
        file.close()
    files.clear()
    _remove_ours(path)


def read_exactly(fd: int, memory: memoryview, offset: int) -> int:
    """Fill ``memory`` from the file's bytes at ``offset`` (``preadv`` until done, no mapping);
    returns the bytes read, fewer than ``len(memory)`` only where the file ends first."""
    done = 0
    while done < len(memory):
        n = os.preadv(fd, [memory[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def _pread(fd: int, memory: memoryview, offset: int, where: str) -> None:
    done = read_exactly(fd, memory, offset)
    if done < len(memory):
        raise OSError(f"swap file in {where} ended at byte {offset + done}: it was truncated while training")


def _pwrite(fd: int, memory: memoryview, offset: int, where: str) -> None:
    done = 0
    try:
        while done < len(memory):
            done += os.pwrite(fd, memory[done:], offset + done)
    except OSError as error:
        raise OSError(error.errno, f"writing the optimizer swap files in {where} failed: "
                                   f"{error.strerror or error} ({KEY})") from error
