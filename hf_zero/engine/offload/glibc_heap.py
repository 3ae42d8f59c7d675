"""glibc's malloc under offload: large freed blocks go back to the OS, so host RSS does not creep.

[Note: mmap threshold] glibc serves a request of at least ``M_MMAP_THRESHOLD`` bytes with its own
``mmap`` and unmaps it when freed; smaller ones come from the heap, which keeps freed memory for
reuse. The threshold starts at 128 KiB and *slides*: each time a mapped block is freed, the
threshold rises to that block's size (up to 32 MiB on 64-bit). After the first step of an
offload run, the host tensors the step and the stage-3 gathers make and free every step (unit
gathers on CPU ranks, the NVMe tier's and the host step's temporaries, Python's own buffers, up
to 32 MiB each) then come from the heap, where fragmentation keeps them: RSS grows step after
step, by up to the size of the model's gathered units (tests/engine/test_glibc_heap.py shows it
on CPU ranks), while the offload tiers already hold most of the host's memory. A 13B model at
stage 3 with its optimizer state on the host has no room for that.

Fixing the threshold (``mallopt(M_MMAP_THRESHOLD, 1 MiB)``, which also turns the sliding off)
keeps every block of 1 MiB or more mapped and returned when freed. Neither torch nor
transformers has an API for it (torch's CPU allocator is glibc's malloc; ``MALLOC_MMAP_THRESHOLD_``
in the environment works only if set before the process starts, which a launcher we do not own
decides), so the engine calls glibc's ``mallopt`` through ctypes, once per process, when it first
allocates host memory for offload (``HostMemory``): only on glibc (``gnu_get_libc_version``
exists), said once by the job's first rank, and not at all with ``HF_ZERO_MALLOC_DEFAULTS=1``.
The cost is one ``mmap``/``munmap`` pair per block of 1 MiB or more, against a step of seconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "HF_ZERO_MALLOC_DEFAULTS"  # "1": leave glibc's malloc settings as they are
M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD_BYTES = 1 << 20

_applied: bool | None = None  # None: not tried yet in this process


def _libc():
    """glibc, or None on any other C library (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def fix_mmap_threshold() -> bool:
    """[Note: mmap threshold]: fix glibc's mmap threshold at ``THRESHOLD_BYTES``, once per process.
    True if it is fixed (now or earlier), False where it was not (opted out, not glibc, refused)."""
    global _applied
    if _applied is not None:
        return _applied
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: allowed values are 1 (leave glibc's malloc as it is) and 0 or unset")
    _applied = False
    if value == "1":
        return False
    libc = _libc()
    if libc is None:
        return False
    _applied = libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1
    if _applied:
        from hf_zero.first_rank import is_first_rank

        if is_first_rank():
            print(f"hf_zero: offload: glibc's mmap threshold fixed at {THRESHOLD_BYTES >> 20} MiB, so freed host "
                  f"blocks return to the OS and RSS does not creep step after step ({ENV}=1 leaves malloc as it is)",
                  file=sys.stderr, flush=True)
    return _applied
