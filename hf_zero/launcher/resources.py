"""Hosts and device ids of a launch: hostfile, `--include`/`--exclude`, `--num_nodes`/`--num_gpus`.

[Note: slots]
A hostfile line `worker-1 slots=4` gives host worker-1 the device ids ("slots") 0, 1, 2, 3.
`--include worker-1:0,2` keeps ids 0 and 2 only: that node starts 2 processes with
CUDA_VISIBLE_DEVICES=0,2. Without a hostfile the pool is one host, `localhost`, whose ids
are the local devices. `Hosts` keeps hostfile order, and node ranks follow that order.

Filter syntax, as DeepSpeed's runner: `NODE_SPEC[@NODE_SPEC...]`, `NODE_SPEC = HOST[:ID[,ID...]]`;
a bare HOST means all of its ids.
    --include 'worker-0@worker-1:0,2'   worker-0 whole, ids 0 and 2 of worker-1
    --exclude 'worker-1:0'              everything except id 0 of worker-1
"""

import os
import re
from collections.abc import Callable

from hf_zero.launcher.args import LaunchOptions

Hosts = dict[str, tuple[int, ...]]
"""Host name -> device ids used on it, in hostfile order (see [Note: slots])."""

LOCALHOST = "localhost"
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\S*)$")


def parse_hostfile(text: str, name: str) -> dict[str, int]:
    """Parse hostfile text (`name` is only for messages) into host -> slot count.

    Blank lines and `#` comments are ignored; every other line is `HOSTNAME slots=N`.
    """
    slots: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if match is None:
            raise ValueError(f"{name}:{lineno}: expected 'HOSTNAME slots=N', got {line!r}")
        host, count = match.groups()
        if not (count.isascii() and count.isdigit()) or int(count) < 1:
            raise ValueError(
                f"{name}:{lineno}: slots of host {host!r} must be a positive integer, "
                f"got slots={count!r}"
            )
        if host in slots:
            raise ValueError(
                f"{name}:{lineno}: host {host!r} is listed twice (first on line "
                f"{first_seen[host]}); give each host one line"
            )
        slots[host] = int(count)
        first_seen[host] = lineno
    if not slots:
        raise ValueError(f"hostfile {name!r} lists no hosts; write one 'HOSTNAME slots=N' line per host")
    return slots


def read_hostfile(path: str) -> dict[str, int]:
    """The hostfile's hosts and slots; only a regular file of at most 1 MiB is read (a FIFO or a
    device would block or never end)."""
    from hf_zero.config.small_file import read_small_text

    if not os.path.lexists(path):
        raise ValueError(f"hostfile {path!r} not found")
    return parse_hostfile(read_small_text(path, what="hostfile", error=ValueError), path)


def parse_filter(spec: str, flag: str) -> list[tuple[str, tuple[int, ...] | None]]:
    """Parse an --include/--exclude SPEC into (host, ids or None for all) entries."""
    entries: list[tuple[str, tuple[int, ...] | None]] = []
    for part in spec.split("@"):
        host, has_ids, ids_text = part.partition(":")
        if not host:
            raise ValueError(
                f"{flag} {spec!r} has an entry without a host name ({part!r}); "
                "write HOST[:ID,ID...] entries separated by '@'"
            )
        if not has_ids:
            entries.append((host, None))
            continue
        ids = ids_text.split(",")
        bad = [i for i in ids if not (i.isascii() and i.isdigit())]
        if bad:
            raise ValueError(
                f"{flag} {spec!r}: device id {bad[0]!r} of host {host!r} is not a "
                "non-negative integer; write HOST:0,1"
            )
        entries.append((host, tuple(int(i) for i in ids)))
    return entries


def apply_filter(hosts: Hosts, include: str, exclude: str) -> Hosts:
    """Keep the hosts/ids `include` names, or drop those `exclude` names (not both)."""
    if include and exclude:
        raise ValueError(f"--include {include!r} and --exclude {exclude!r} cannot be used together; keep one")
    if not include and not exclude:
        return dict(hosts)
    flag, spec = ("--include", include) if include else ("--exclude", exclude)
    chosen = {} if include else {host: set(ids) for host, ids in hosts.items()}
    for host, ids in parse_filter(spec, flag):
        if host not in hosts:
            raise ValueError(
                f"{flag} {spec!r} names unknown host {host!r}; known hosts: {', '.join(hosts)}"
            )
        for device in ids or ():
            if device not in hosts[host]:
                raise ValueError(
                    f"{flag} {spec!r} names unknown device id {device} on host {host!r}, "
                    f"which has device ids {','.join(map(str, hosts[host]))}"
                )
        named = set(hosts[host] if ids is None else ids)
        if include:
            chosen.setdefault(host, set()).update(named)
        else:
            chosen[host] -= named
    kept = {host: tuple(sorted(chosen[host])) for host in hosts if chosen.get(host)}
    if not kept:
        raise ValueError(f"{flag} {spec!r} leaves no device to run on")
    return kept


def resolve_hosts(options: LaunchOptions, device_count: Callable[[], int]) -> Hosts:
    """The hosts and device ids this launch uses.

    `device_count` is called only without a hostfile and without --num_gpus (it imports torch).
    """
    if options.hostfile is None:
        if options.include or options.exclude or options.nproc_per_node is None:
            local = max(device_count(), 1)
        else:
            local = options.nproc_per_node
        return apply_filter({LOCALHOST: tuple(range(local))}, options.include, options.exclude)
    pool = {host: tuple(range(n)) for host, n in read_hostfile(options.hostfile).items()}
    if options.include or options.exclude:
        return apply_filter(pool, options.include, options.exclude)
    if options.num_nodes is not None:
        if options.num_nodes > len(pool):
            raise ValueError(
                f"--num_nodes {options.num_nodes} does not fit hostfile {options.hostfile!r}, "
                f"which lists {len(pool)} host(s): {', '.join(pool)}"
            )
        pool = dict(list(pool.items())[: options.num_nodes])
    if options.nproc_per_node is not None:
        for host, ids in pool.items():
            if len(ids) < options.nproc_per_node:
                raise ValueError(
                    f"--num_gpus {options.nproc_per_node} does not fit hostfile "
                    f"{options.hostfile!r}: host {host!r} has slots={len(ids)}"
                )
        pool = {host: ids[: options.nproc_per_node] for host, ids in pool.items()}
    return pool
