"""The NVMe offload directory: exists, is a writable directory, has room, and how fast it is.

The speed test writes ``test_bytes`` (64 MiB by default) in 4 MiB chunks, fsyncs, drops the
file from the page cache (``posix_fadvise(DONTNEED)``, where the OS has it) and reads it back;
O_DIRECT is not used, so the read can still be served partly from a cache. The test file is
always removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from hf_zero.byte_units import fmt_bytes
from hf_zero.doctor.result import CheckResult, failed, passed, warned

NVME = "nvme"
TEST_BYTES = 64 * 2**20
CHUNK = 4 * 2**20
SLOW_GBPS = 0.5
"""Below this (write or read), the path is unlikely to be a local NVMe drive."""


def measure_throughput(directory: str, size: int = TEST_BYTES) -> tuple[float, float]:
    """(write GB/s, read GB/s) of one ``size``-byte file in ``directory``; the file is removed."""
    chunk = os.urandom(min(CHUNK, size))
    fd, path = tempfile.mkstemp(prefix=".hf_zero_doctor_", dir=directory)
    try:
        start = time.perf_counter()
        written = 0
        while written < size:
            written += os.write(fd, chunk[: size - written])
        os.fsync(fd)
        write_s = time.perf_counter() - start
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.lseek(fd, 0, os.SEEK_SET)
        start = time.perf_counter()
        while os.read(fd, CHUNK):
            pass
        read_s = time.perf_counter() - start
    finally:
        os.close(fd)
        os.remove(path)
    return size / max(write_s, 1e-9) / 1e9, size / max(read_s, 1e-9) / 1e9


def _writable(directory: str) -> str | None:
    """None if a file can be created and removed in ``directory``, else the OS's reason."""
    try:
        fd, path = tempfile.mkstemp(prefix=".hf_zero_doctor_", dir=directory)
    except OSError as error:
        return error.strerror or str(error)
    os.close(fd)
    os.remove(path)
    return None


def check_nvme(path: str, keys: str, needed: int | None, *, test_bytes: int = TEST_BYTES,
               slow_gbps: float = SLOW_GBPS) -> CheckResult:
    """``path`` (the ``keys`` that name it, e.g. ``offload_optimizer.nvme_path in z.json``) against
    ``needed`` bytes on this node (None: unknown, no --model)."""
    name = f"{NVME} {path}"
    where = f"nvme_path {path!r} ({keys})"
    if not os.path.exists(path):
        return failed(name, f"{where} does not exist",
                      f"create it (mkdir -p {path}) on a local NVMe drive, or point nvme_path at one")
    if not os.path.isdir(path):
        return failed(name, f"{where} is not a directory", "point nvme_path at a directory on a local NVMe drive")
    problem = _writable(path)
    if problem is not None:
        return failed(name, f"{where} is not writable: {problem}",
                      f"make it writable for this user (chown/chmod {path}), or use another directory")
    free = shutil.disk_usage(path).free
    room = f"{fmt_bytes(free)} free" + ("" if needed is None else f", {fmt_bytes(needed)} needed on this node")
    if needed is not None and needed > free:
        return failed(name, f"{where}: {room}",
                      "free space there, use a larger drive, or offload less (offload_optimizer.ratio, "
                      "more nodes)")
    if free < 2 * test_bytes:
        return warned(name, f"{where}: {room}; too little room for the {fmt_bytes(test_bytes)} speed test",
                      "free space on the drive")
    try:
        write_gbps, read_gbps = measure_throughput(path, test_bytes)
    except OSError as error:
        return failed(name, f"{where}: the {fmt_bytes(test_bytes)} speed test failed: {error.strerror or error}",
                      "check the drive (dmesg, df) and its free space")
    speed = f"write {write_gbps:.2f} GB/s, read {read_gbps:.2f} GB/s ({fmt_bytes(test_bytes)} test file)"
    if needed is None:
        room += " (pass --model to compare with what the offload needs)"
    if min(write_gbps, read_gbps) < slow_gbps:
        return warned(name, f"{where}: {room}; {speed}",
                      f"below {slow_gbps} GB/s: offload will be slow; use a local NVMe drive, not a network "
                      "filesystem or a spinning disk")
    return passed(name, f"{where}: {room}; {speed}")
