"""Whether the optimizer offload's host part fits the host: checked before any of it is allocated.

[Note: host room] The host tiers are allocated when the optimizer comes (``pieces.build_masters``):
pinned fp32 grads of every offloaded element (4 bytes each), the masters and per-element optimizer
state of those kept in host memory (``nvme_swap.bytes_per_element``: AdamW 12 bytes, 8 with bf16
state; the state itself comes at the first step) and, with NVMe, ``buffer_count`` chunk buffers.
A host that cannot hold that does not say so: the kernel kills the rank (SIGKILL, exit -9)
minutes later. A 13B run on an H100 asked for 103 GiB of host tiers with about 98 GiB available
and was killed while writing its masters (bench/results/h100_session17_summary.md).

So every rank reads its host's memory once, before its tier is built, and the ranks exchange
their readings (``readings``: per host the smallest ``MemAvailable`` among its ranks, which then
share it equally; ``host_share`` "auto" sizes from the tightest host's, ``tightest``, so every
rank takes the same share and builds the same tiers: split_tier.py). ``check`` refuses
a need above a rank's part of the tightest host, on every rank at once (a host that refused
alone would leave the others waiting in the next collective), with the numbers and the setting
that would fit. A need that fits but leaves less than ``MARGIN`` of the host free is allowed with
one warning: speculation's copies then find no room, and the page cache little. Page cache
counts as available (the kernel drops it for us); what other processes hold does not. Speculation's copies are not counted here: they check their own room
([Note: promised room] in speculation.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from hf_zero.byte_units import fmt_bytes
from hf_zero.config.errors import ConfigError
from hf_zero.engine.offload.host_memory import meminfo  # tests replace host_room.meminfo
from hf_zero.engine.offload.settings import ratio_of_first

MARGIN = 0.10  # of the host's memory (MemTotal): below this much left free, a warning; "auto" leaves it


@dataclass(frozen=True)
class HostReading:
    """One host's memory as its ranks agree on it."""

    available: int  # the smallest MemAvailable among this host's ranks
    total: int  # MemTotal
    ranks: int  # ranks on this host
    host: str = ""

    @property
    def per_rank(self) -> float:
        return self.available / self.ranks

    @property
    def room(self) -> float:
        """A rank's part of what it may take while ``MARGIN`` of the host (MemTotal) stays free."""
        return (self.available - MARGIN * self.total) / self.ranks


def readings(ctx) -> list[HostReading]:
    """Every host's reading, this rank's host first, the same on every rank (collective over
    ``ctx.group`` when there are several ranks), so every rank of the job can judge every host and
    all refuse together; empty where a host has no /proc/meminfo."""
    import torch.distributed as dist

    from hf_zero.engine.offload.nvme_files import host_name

    got = meminfo()
    mine = (host_name(), *(got if got is not None else (-1, -1)))
    everyone = [mine]
    if ctx is not None and ctx.world_size > 1:
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, mine, group=ctx.group)
    if any(a < 0 for _, a, _ in everyone):
        return []
    hosts = [mine[0]] + sorted({h for h, _, _ in everyone} - {mine[0]})
    out = []
    for host in hosts:
        here = [(a, t) for (h, a, t) in everyone if h == host]
        out.append(HostReading(min(a for a, _ in here), max(t for _, t in here), len(here), host))
    return out


@dataclass(frozen=True)
class HostNeed:
    """What one rank's optimizer offload allocates in host memory (see the Note)."""

    elements: int  # offloaded elements (their fp32 grads are on the host, whatever the tier)
    host_elements: int  # of those, the ones whose masters and state stay in host memory
    per_element: int  # bytes of master and state per element (``nvme_swap.bytes_per_element``)
    buffer_bytes: int = 0  # NVMe chunk buffers
    largest: int = 0  # elements of the largest offloaded bucket: a lower ratio still offloads whole buckets

    @property
    def nbytes(self) -> int:
        return 4 * self.elements + self.per_element * self.host_elements + self.buffer_bytes

    def parts(self) -> str:
        out = [f"fp32 grads {fmt_bytes(4 * self.elements)} (4 bytes x {self.elements:,} offloaded elements)"]
        if self.host_elements:
            out.append(f"masters and optimizer state {fmt_bytes(self.per_element * self.host_elements)} "
                       f"({self.per_element} bytes x {self.host_elements:,} elements)")
        if self.buffer_bytes:
            out.append(f"NVMe chunk buffers {fmt_bytes(self.buffer_bytes)}")
        return ", ".join(out)


def tightest(hosts: list[HostReading]) -> HostReading | None:
    """The host with the least room a rank, the same on every rank (ties by name: ``readings``
    lists this rank's host first): what every decision taken from the readings must use, so that
    all ranks take the same one (a host_share, a refusal) and build the same tiers."""
    return min(hosts, key=lambda r: (r.per_rank, r.host)) if hosts else None


def check(need: HostNeed, hosts: list[HostReading], offload) -> None:
    """Refuse (``ConfigError``) a need above a rank's part of the tightest host, naming what would
    fit, on every rank alike (each rank's need is the same: shards are equal); warn when it leaves
    less than ``MARGIN`` of that host free. ``offload``: the ``OptimizerOffload``."""
    if not hosts:
        return
    got = tightest(hosts)
    per_rank = got.per_rank
    where = f"host {got.host!r}" if len(hosts) > 1 else "this host"
    head = (f"hf_zero: offload_optimizer (device {offload.device!r}, ratio {offload.ratio!r}"
            + (f", host_share {offload.host_share!r}" if offload.device == "nvme" else "") + ") needs "
            f"{fmt_bytes(need.nbytes)} of host memory on each of {where}'s {got.ranks} rank(s): {need.parts()}. "
            f"The host has {fmt_bytes(got.available)} available (MemAvailable, the least of its ranks' readings"
            f", of {fmt_bytes(got.total)}), {fmt_bytes(per_rank)} a rank")
    if need.nbytes > per_rank:
        raise ConfigError(head + "; the kernel would kill the run while it allocates. "
                          + _what_fits(need, per_rank, offload))
    if got.available - need.nbytes * got.ranks < MARGIN * got.total:
        warnings.warn(head + f"; that leaves less than {MARGIN:.0%} of the host free (speculation's copies will "
                      "find little room, and other processes none). " + _what_fits(need, got.room, offload),
                      RuntimeWarning, stacklevel=3)


def auto_start(shard_sizes: list[int], per_element: int, hosts: list, offloaded) -> float:
    """The first step's ratio under ``offload_optimizer.ratio`` "auto" ([Note: auto ratio] in
    auto_ratio.py): 1, or the first buckets whose host part (4 bytes of fp32 grad and
    ``per_element`` of master and state an element, ``HostNeed``) leaves ``MARGIN`` of the tightest
    host free a rank. 1 also when not one bucket fits, so that ``check`` refuses with the numbers."""
    got = tightest(hosts)
    if got is None:
        return 1.0
    room = got.room
    keep, acc = 0, 0
    while keep < len(shard_sizes) and (4 + per_element) * (acc + shard_sizes[keep]) <= room:
        acc += shard_sizes[keep]
        keep += 1
    return 1.0 if keep == 0 else ratio_of_first(shard_sizes, keep, offloaded)


SHORT = ("Not even a hundredth of it fits: free host memory (other processes hold it), run fewer ranks on this "
         "host, or keep the optimizer on the GPU (no offload_optimizer).")


def _what_fits(need: HostNeed, room: float, offload) -> str:
    """The setting that would fit ``room`` bytes, worded for the user's keys (to 0.01, rounded down)."""
    ratio = 1.0 if offload.ratio == "auto" else float(offload.ratio)
    auto = (" (ratio \"auto\" starts from what the host holds, then chooses; not even its first bucket fits here)"
            if offload.ratio == "auto" else "")
    if offload.device == "nvme" and need.elements:
        spare = room - 4 * need.elements - need.buffer_bytes
        share = int(100 * spare / (need.per_element * need.elements)) / 100
        if share > 0:
            return (f"Fits: offload_optimizer.host_share at most {share:.2f} (or \"auto\", which reads the host's "
                    f"memory and leaves {MARGIN:.0%} free), or a lower offload_optimizer.ratio{auto}.")
        fit = max(0.0, (room - need.buffer_bytes) / 4 - need.largest)  # the bucket a ratio ends in is offloaded whole
        lower = int(100 * ratio * fit / need.elements) / 100
        if lower <= 0:
            return SHORT
        return (f"Even with host_share 0 its fp32 grads and buffers do not fit: a lower offload_optimizer.ratio{auto}, "
                f"about {lower:.2f} or less, keeps more on the GPU.")
    fit = max(0.0, room / (4 + need.per_element) - need.largest)  # the bucket a ratio ends in is offloaded whole
    lower = int(100 * ratio * fit / max(1, need.elements)) / 100
    if lower <= 0:
        return SHORT
    return (f"Fits: offload_optimizer.ratio about {lower:.2f} or less{auto} (more of the optimizer on the GPU), "
            "or device \"nvme\" with a host_share (masters and state in swap files), or fewer ranks on this host.")
