"""Measurements of this machine, each in one small function so tests can replace it.

None means "unknown here" (no /proc/meminfo, no CUDA); the checks then SKIP.
"""

from __future__ import annotations

import resource

MEMINFO = "/proc/meminfo"


def mem_available_bytes(path: str = MEMINFO) -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (what can be allocated without swapping); of
    this machine's, as the offload tiers read it (``host_memory.meminfo``: the cgroup's room where
    that is less, [Note: cgroup limit]); ``path``: another meminfo file, read as it is."""
    if path == MEMINFO:
        from hf_zero.engine.offload.host_memory import meminfo

        got = meminfo()
        return None if got is None else got[0]
    try:
        with open(path, encoding="ascii") as file:
            for line in file:
                name, _, rest = line.partition(":")
                if name == "MemAvailable":
                    value, _, unit = rest.strip().partition(" ")
                    return int(value) * (1024 if unit.strip().lower() == "kb" else 1)
    except (OSError, ValueError):
        return None
    return None


def mem_total_bytes() -> int | None:
    """``MemTotal`` of this machine in bytes, as the offload tiers read it (``host_memory.meminfo``:
    the cgroup's limit where that is less): offload_optimizer.ratio "auto" keeps 10% of it free."""
    from hf_zero.engine.offload.host_memory import meminfo

    got = meminfo()
    return None if got is None else got[1]


def memlock_limit_bytes() -> int | None:
    """The soft RLIMIT_MEMLOCK (``ulimit -l``) in bytes; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def cuda_free_bytes(devices: int) -> list[int] | None:
    """Free bytes of CUDA devices 0..devices-1 (``torch.cuda.mem_get_info``); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    count = min(devices, torch.cuda.device_count())
    return [torch.cuda.mem_get_info(i)[0] for i in range(count)]
