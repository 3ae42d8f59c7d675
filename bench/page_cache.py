"""How much of a set of files sits in the page cache, and emptying it of them (bench/lazy_load.py).

- ``resident_fraction(paths)``: the share of the files' pages in the page cache, from
  ``mincore(2)`` on a read-only shared mapping of each file. The mapping is never touched, so
  nothing is read and nothing counts in this process's RSS.
- ``drop(paths, whole_cache)``: with ``whole_cache`` and as root, ``sync`` then
  ``echo 3 > /proc/sys/vm/drop_caches`` (the whole machine's page cache). Otherwise, or where that
  is not allowed (not root, or /proc/sys read-only in a container), each file's own pages:
  ``fsync`` then ``posix_fadvise(POSIX_FADV_DONTNEED)``, which any process that can open the file
  may ask. It returns how (``"drop_caches"``, ``"fadvise"``, with the reason the
  first was not used) and the resident share measured afterwards, so a record says what it got.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(path: str) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages of ``path``)."""
    size = os.path.getsize(path)
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    if pages == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(b & 1 for b in bytes(vec)), pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_fraction(paths) -> float:
    counts = [resident_pages(p) for p in paths]
    total = sum(n for _, n in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


def drop(paths, whole_cache: bool = True) -> dict:
    """Empty the page cache of ``paths`` (see the module docstring); what was done and what is left."""
    paths = list(paths)
    how, why = "drop_caches", None
    if not whole_cache:
        how, why = "fadvise", "asked for the files' pages only"
    elif os.geteuid() != 0:
        how, why = "fadvise", "not root: /proc/sys/vm/drop_caches cannot be written"
    else:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            how, why = "fadvise", f"root, but /proc/sys/vm/drop_caches refused: {e}"
    if how == "fadvise":
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return {"how": how, "why_not_drop_caches": why, "resident_after": resident_fraction(paths)}
