"""``SplitTier``: offloaded masters and optimizer state partly in host memory, the rest on NVMe.

[Note: host share] With ``offload_optimizer.device = "nvme"``, ``host_share`` of the offloaded
elements keeps its fp32 masters and optimizer state in host memory (a ``HostTier``) and the rest
in swap files (an ``NvmeTier``); the GPU share (``ratio``) is unchanged. The split is decided once,
when the tier is built, *by chunk* (the unit the host step fetches and releases, ``tiers.StateTier``)
in chunk order: the first chunks go to host memory until ``host_share`` of the offloaded elements
is there, as ``OptimizerOffload.offloaded`` splits buckets by ``ratio``:

    chunks (elements):   c0 (400)   c1 (400)   c2 (400)   c3 (400)      host_share 0.5
    placed before c:          0        400        800       1200         < 0.5 x 1600 = 800?
    tier:                   host       host       nvme       nvme

A chunk is never split between the two, so the share is met to within a chunk (``buffer_size``
elements, 1e8 by default: 1.2 GB of AdamW state). The first chunks hold the first buckets, whose
grads come down first in backward, so the host-memory part is stepped first while the NVMe tier
reads its first chunk ahead. Which tier holds a chunk changes where bytes live, never what the
step computes: the same optimizer steps the same pieces in the same order, so the results are bit
for bit those of all-host and of all-NVMe.

``host_share`` "auto": as much as fits in the host memory available when the tier is built
(``MemAvailable``; ranks on one host split the smallest reading among them equally; every rank
sizes from the host with the least room a rank, ``host_room.tightest``, so all take one share and
build the same tiers, and the chosen share is rounded down to whole chunks), less
``MARGIN`` of the host's memory and less what this rank's offload needs beside the state in any
case (its fp32 host grads, 4 bytes per offloaded element, and the NVMe chunk buffers):

    per rank   = (min MemAvailable of the host's ranks - MARGIN x MemTotal) / ranks on the host
    state      = 4 + s x state tensors  (bytes of master and state per element; s = 4, or 2 with
                                         state_dtype "bf16": [Note: bf16 swap files] in nvme_swap.py)
    budget     = per rank - 4 x offloaded elements - buffer_count x state x chunk
    host_share = budget / (state x offloaded elements), within [0, 1]

(AdamW: 12 bytes per element in host memory, 16 with its grad; bf16 state 8, 12.) Room is also
left for speculation's copies ([Note: speculation]): only host-memory chunks keep copies, at most
``copy_share`` (the speculation budget, 0.25 by default) of the offloaded elements, ``state`` bytes
each, so the host part H (elements) must satisfy ``state x (H + min(copy_share x E, H)) <= budget``:

    H = budget / state - copy_share x E     when that is at least copy_share x E, else
    H = budget / (2 x state)                (every host element may have a copy)

It is left whether or not the run clips (the tier is built before the Trainer says so): without
clipping "auto" errs toward NVMe by that much. The chosen share and its
numbers are logged once (rank 0). It is read again at each build: after ``ratio`` "auto" rebuilds
the host step ([Note: auto ratio]) the earlier masters and state are still held while it reads, so
that reading is lower and the share errs toward NVMe.

Under clipping with the step in backward ([Note: speculation]) each side keeps its own tier's
rule, per chunk (``on_disk_of`` of its buckets, read once in ``HostStep.overlap``): the host-memory
chunks speculate as the host tier's do (the same policy and copy budget; a redo counts in the run
report's ``host_steps_redone``), while the NVMe chunks wait for the global norm, since their
masters and state are on disk between steps and a copy of them would be a copy of disk state.
The worker goes in chunk order (``on_disk``, as the NVMe tier's), which suits both sides:

    backward:    [grads c0][grads c1][grads c2][grads c3]  norm  step     (c0, c1 host; c2, c3 NVMe)
    NVMe tier:   [read c2 ................................]
    CPU worker:      [keep c0 | step c0][keep c1 | step c1]     [redo c0, c1 if clipped][step c2][step c3]

The host chunks' grads come down first and each is stepped as it comes; after the verdict any
host chunk redone (or held by the policy or budget) goes first, while the NVMe tier still reads
its first chunk ahead (``begin``, when chunk 0 is handed over), then the NVMe chunks in chunk
order, as the NVMe tier streams them. A skipped step undoes the host chunks only; the NVMe chunks
were never stepped. The run report counts each bucket where its tier keeps it (``on_disk_of``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from hf_zero.engine.offload.host_room import MARGIN, HostReading  # MARGIN: of MemTotal, left free by "auto"


def host_chunks(chunk_numel: list[int], share: float, whole: bool = False) -> int:
    """How many leading chunks (by their elements, in chunk order) live in host memory: each one
    whose elements before it are below ``share`` of all (0: none, 1: all); with ``whole``, each one
    that fits inside ``share`` of all (a share "auto" chose from the memory there is: never more)."""
    total, acc, count = sum(chunk_numel), 0, 0
    for n in chunk_numel:
        if not acc < share * total or (whole and acc + n > share * total):
            break
        acc += n
        count += 1
    return count


@dataclass(frozen=True)
class AutoShare:
    """What "auto" decided, and from what (the log line)."""

    share: float
    available_bytes: int  # the smallest MemAvailable of this host's ranks
    total_bytes: int  # MemTotal
    ranks_on_host: int
    state_bytes_per_element: int  # 4 + s x state tensors (s: 4, or 2 with bf16 state)
    fixed_bytes: int  # grads and chunk buffers of this rank's offload
    copy_share: float = 0.0  # room left for speculation's copies, a share of the offloaded elements

    def line(self) -> str:
        from hf_zero.byte_units import fmt_bytes

        return (f"hf_zero: offload_optimizer.host_share \"auto\" chose {self.share:.4f}: "
                f"{fmt_bytes(self.available_bytes)} of host memory available, {MARGIN:.0%} of "
                f"{fmt_bytes(self.total_bytes)} kept free, shared by {self.ranks_on_host} rank(s) on this host; "
                f"{fmt_bytes(self.fixed_bytes)} per rank for host grads and NVMe chunk buffers, "
                f"{self.state_bytes_per_element} bytes per element of masters and optimizer state"
                + (f", and as much again for speculation's copies of up to {self.copy_share:g} of the elements"
                   if self.copy_share else ""))


def auto_share(chunk_numel: list[int], per_element: int, buffer_count: int, got: HostReading | None,
               copy_share: float = 0.0) -> AutoShare:
    """``host_share`` "auto" for chunks of ``chunk_numel`` elements (see the Note), ``per_element``
    bytes of master and state per element (``nvme_swap.bytes_per_element``), room for speculation's
    copies of up to ``copy_share`` of the elements, from a host's reading (``host_room.tightest``: every
    rank takes the same, so they agree; None: no host memory to read, share 0)."""
    available, total, ranks = (got.available, got.total, got.ranks) if got is not None else (0, 0, 1)
    per_rank = (available - MARGIN * total) / ranks
    elements = sum(chunk_numel)
    fixed = 4 * elements + buffer_count * per_element * max(chunk_numel, default=0)
    room = max(0.0, per_rank - fixed) / per_element  # elements of masters + state (and copies)
    copies = copy_share * elements
    host = room - copies if room >= 2 * copies else room / 2
    share = 0.0 if elements == 0 else min(1.0, host / elements)
    return AutoShare(share, available, total, ranks, per_element, int(fixed), copy_share)


def say(choice: AutoShare, ctx) -> None:
    """The log line, from rank 0."""
    if ctx is None or ctx.rank == 0:
        print(choice.line(), file=sys.stderr, flush=True)


class SplitTier:
    """The ``tiers.StateTier`` of a host/NVMe split: chunks ``[0, count)`` in ``host`` (a
    ``HostTier`` over those chunks), the rest in ``nvme`` (an ``NvmeTier`` over the rest, its
    chunk ``c - count``). See [Note: host share]."""

    on_disk = True  # a chunk is on NVMe: masters written to files at build, the worker in chunk order

    def __init__(self, host, nvme, chunks: list[list[int]], count: int) -> None:
        if not 0 < count < len(chunks):
            raise AssertionError(f"a split needs chunks on both sides, got {count} of {len(chunks)} in host memory")
        self.host, self.nvme, self.chunks, self.count = host, nvme, chunks, count
        self._host_buckets = {i for chunk in chunks[:count] for i in chunk}

    def _side(self, c: int):
        return (self.host, c) if c < self.count else (self.nvme, c - self.count)

    def on_disk_of(self, i: int) -> bool:
        return i not in self._host_buckets

    def master(self, i: int, shard: torch.Tensor) -> torch.Tensor:
        return (self.nvme if self.on_disk_of(i) else self.host).master(i, shard)

    def begin(self, optimizer: torch.optim.Optimizer, pieces_of: dict[int, list]) -> None:
        self.host.begin(optimizer, pieces_of)
        self.nvme.begin(optimizer, pieces_of)  # reads its first chunk while the host chunks step

    def fetch(self, c: int, masters: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        tier, local = self._side(c)
        return tier.fetch(local, masters)

    def release(self, c: int, uploaded) -> None:
        tier, local = self._side(c)
        tier.release(local, uploaded)

    def finish(self) -> None:
        try:
            self.host.finish()
        finally:
            self.nvme.finish()

    def resident_bytes(self) -> int:
        return self.host.resident_bytes() + self.nvme.resident_bytes()

    def disk_bytes(self) -> int:
        return self.nvme.disk_bytes()

    def close(self) -> None:
        try:
            self.host.close()
        finally:
            self.nvme.close()
