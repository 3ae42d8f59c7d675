"""The memory limit of the cgroup this process runs in, where there is one.

[Note: cgroup limit] /proc/meminfo describes the machine. A process in a container (Docker,
Kubernetes, a Slurm job with memory cgroups) may be held to less: its cgroup's ``memory.max``
(v2) or ``memory.limit_in_bytes`` (v1), and the kernel kills it (SIGKILL, exit -9) when the
cgroup's usage reaches the limit and nothing can be reclaimed. The host-room check and the
speculation copies read ``host_memory.meminfo``, which takes the smaller of the machine's numbers
and the cgroup's: for a limited cgroup

    total     = the limit
    available = limit - usage + inactive file pages (page cache the kernel drops first)

for the process's own cgroup and each cgroup above it (its paths in ``/proc/self/cgroup``: v2's
under ``/sys/fs/cgroup``, v1's ``memory`` controller's under ``/sys/fs/cgroup/memory``; inside a
container's cgroup namespace both are ``/``, the container's own), the tightest of them. A cgroup
without a limit (``max``, or v1's huge number) adds nothing; a file that cannot be read leaves
the machine's numbers.
"""

from __future__ import annotations

import os

ROOT = "/sys/fs/cgroup"
UNLIMITED_V1 = 1 << 60  # v1 writes about 2**63 (rounded to a page) for "no limit"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _stat(path: str, key: str) -> int:
    text = _read(path) or ""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in v1's ``memory`` controller (None: none)."""
    v2 = v1 = None
    for line in (_read(proc_cgroup) or "").splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and line.startswith("0::"):
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _upwards(base: str, path: str) -> list[str]:
    """``base``/``path`` and each directory above it up to ``base``, the deepest first."""
    parts = [p for p in path.split("/") if p]
    return [os.path.join(base, *parts[:n]) for n in range(len(parts), -1, -1)]


def _room(d: str, cap_file: str, used_file: str, inactive_key: str, unlimited: int) -> tuple[int, int] | None:
    cap, used = _read(os.path.join(d, cap_file)), _read(os.path.join(d, used_file))
    if cap is None or used is None or not cap.isdigit() or not used.isdigit() or int(cap) >= unlimited:
        return None  # no such cgroup here, or no limit ("max", v1's huge number)
    free = int(cap) - int(used) + _stat(os.path.join(d, "memory.stat"), inactive_key)
    return max(0, min(free, int(cap))), int(cap)


def limit(root: str = ROOT, proc_cgroup: str = "/proc/self/cgroup") -> tuple[int, int] | None:
    """(available, limit) in bytes of the tightest limited cgroup holding this process, or None
    where no cgroup limits it (or none can be read). See [Note: cgroup limit]."""
    v2, v1 = _paths(proc_cgroup)
    found = []
    if v2 is not None:
        for d in _upwards(root, v2):
            found.append(_room(d, "memory.max", "memory.current", "inactive_file", 1 << 63))
    if v1 is not None:
        for d in _upwards(os.path.join(root, "memory"), v1):
            found.append(_room(d, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file",
                               UNLIMITED_V1))
    found = [f for f in found if f is not None]
    return min(found) if found else None
