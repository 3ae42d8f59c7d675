"""Measurements of this machine, each in one small function so tests can replace it.

None means "unknown here" (no /proc/meminfo, no CUDA); the checks then SKIP.
"""

from __future__ import annotations

import resource

MEMINFO = "/proc/meminfo"


def mem_available_bytes(path: str = MEMINFO) -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (what can be allocated without swapping); of
    this machine's, the cgroup's room where that is less (a container's memory limit: [Note:
    cgroup limit] in hf_zero/engine/offload/cgroup_memory.py)."""
    found = None
    try:
        with open(path, encoding="ascii") as file:
            for line in file:
                name, _, rest = line.partition(":")
                if name == "MemAvailable":
                    value, _, unit = rest.strip().partition(" ")
                    found = int(value) * (1024 if unit.strip().lower() == "kb" else 1)
                    break
    except (OSError, ValueError):
        return None
    if found is not None and path == MEMINFO:
        from hf_zero.engine.offload import cgroup_memory

        held = cgroup_memory.limit()
        found = found if held is None else min(found, held[0])
    return found


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
