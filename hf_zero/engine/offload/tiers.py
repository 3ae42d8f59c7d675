"""The offload tiers: one interface for everything the engine holds off the GPU, and the one place
that picks host memory or NVMe for it.

[Note: tiers] Two kinds of state leave the device, each to host memory ("cpu") or to swap files
under ``nvme_path`` ("nvme"):

    what                                   interface      "cpu"                 "nvme"
    stage-3 param shards (offload_param)   ShardMemory    host_memory.HostMemory  nvme_params.NvmeParamMemory
    fp32 masters + optimizer state         StateTier      HostTier (below)        nvme_swap.NvmeTier, or with
      (offload_optimizer)                                                         host_share > 0 a
                                                                                  split_tier.SplitTier of both

Both are an ``OffGpu``: ``on_disk`` says whether what they hold outside a step is file pages
(the run report counts it as NVMe, not host memory), and ``close`` lets go of it (the swap
files deleted). A ``ShardMemory`` hands out tensors that *are* the state (``empty``, ``like``),
which rare readers and writers use as they are; each use of a shard reads it through ``stage`` and
the step writes it through ``write`` (the NVMe one: staging buffers and ``pwrite``, so the
process's RSS holds a few buffers, not the shards: nvme_staging.py). A
``StateTier`` moves its state around the host step instead: ``fetch`` a chunk where the
optimizer steps it, ``release`` it back, since the optimizer's per-element state is too large to
keep mapped while it is read and written at memory speed; ``on_disk_of`` says where it keeps
one bucket's (a ``SplitTier`` keeps the first chunks in host memory and the rest on NVMe: [Note:
host share] in split_tier.py): the run report counts it there, and under clipping only a chunk
with no bucket on disk is stepped before the global norm ([Note: speculation]). ``param_memory``
and ``state_tier`` are the factories; nothing else looks at ``device`` or ``host_share``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from hf_zero.engine.offload import host_room
from hf_zero.engine.offload.host_memory import HostMemory
from hf_zero.engine.offload.nvme_files import BLOCK_BYTES
from hf_zero.engine.offload.nvme_params import NvmeParamMemory
from hf_zero.engine.offload import split_tier
from hf_zero.engine.offload.nvme_swap import NvmeTier, bytes_per_element
from hf_zero.engine.offload.settings import OptimizerOffload, ParamOffload
from hf_zero.engine.offload.speculation import DEFAULT_BUDGET
from hf_zero.engine.offload.split_tier import SplitTier


class OffGpu(Protocol):
    """Anything that holds the engine's state off the GPU."""

    on_disk: bool  # what it holds outside a step is file pages (accounting)

    def close(self) -> None: ...


class ShardMemory(OffGpu, Protocol):
    """Tensors off the GPU that are themselves the state (param shards, host masters and grads).

    Each use of a stage-3 shard reads it through ``stage``/``done_with`` (``read_ahead`` the next
    one, ``drop_read_ahead`` at a pass's end) and the step writes it through ``write``: for
    ``HostMemory`` the shard itself and a copy, for ``NvmeParamMemory`` staging buffers and
    ``pwrite`` (nvme_params.py), so the hot paths never read the files' mappings."""

    def empty(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...
    def like(self, src: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...
    def stage(self, shard: torch.Tensor) -> torch.Tensor: ...
    def done_with(self, staged: torch.Tensor, device: torch.device) -> None: ...
    def read_ahead(self, shard: torch.Tensor) -> None: ...
    def drop_read_ahead(self) -> None: ...
    def write(self, shard: torch.Tensor, source: torch.Tensor) -> None: ...
    def write_back(self, shard: torch.Tensor) -> None: ...  # filled through its mapping: to disk, out of memory
    def staging_bytes(self) -> int: ...


class StateTier(OffGpu, Protocol):
    """Where offloaded masters and optimizer state live between host steps (host_step.py).

    Per step: ``begin``; per chunk ``fetch`` (its masters and state where the step reads them),
    the chunk's step and upload, ``release`` (back where they live); ``finish`` once all are."""

    def master(self, i: int, shard: torch.Tensor) -> torch.Tensor: ...
    def begin(self, optimizer: torch.optim.Optimizer, pieces_of: dict[int, list]) -> None: ...
    def fetch(self, c: int, masters: list[torch.Tensor]) -> dict[int, torch.Tensor]: ...
    def release(self, c: int, uploaded) -> None: ...
    def finish(self) -> None: ...
    def resident_bytes(self) -> int: ...
    def on_disk_of(self, i: int) -> bool: ...  # bucket i's state is on disk between steps


class HostTier:
    """``device = "cpu"``: masters and state stay in host memory; nothing moves around the step."""

    on_disk = False

    def __init__(self, memory: HostMemory, chunks: list[list[int]]) -> None:
        self.memory, self.chunks = memory, chunks

    def master(self, i: int, shard: torch.Tensor) -> torch.Tensor:
        return self.memory.like(shard)

    def begin(self, optimizer, pieces_of) -> None:
        pass

    def fetch(self, c: int, masters: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        return {i: masters[i] for i in self.chunks[c]}

    def release(self, c: int, uploaded) -> None:
        pass

    def finish(self) -> None:
        pass

    def resident_bytes(self) -> int:
        return 0  # the masters are counted as masters, the state as optimizer state

    def on_disk_of(self, i: int) -> bool:
        return False

    def close(self) -> None:
        pass


def param_memory(offload: ParamOffload, model, ctx) -> ShardMemory:
    """Where stage 3's param shards go: ``HostMemory``, or ``NvmeParamMemory`` (its directory
    checked for room now: at most the model's params over the ranks, and a block per module for
    rounding)."""
    if offload.device == "cpu":
        return HostMemory(offload.pin_memory)
    world = ctx.world_size if ctx is not None else 1
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    holders = sum(1 for m in model.modules() if next(m.parameters(recurse=False), None) is not None)
    return NvmeParamMemory(offload.nvme_path, -(-params // world) + 2 * BLOCK_BYTES * holders, ctx,
                           pin=offload.pin_memory)


def state_tier(offload: OptimizerOffload | None, chunks: list[list[int]], shard_sizes: list[int],
               memory: HostMemory, ctx=None, optimizer=None, check_room: bool = True) -> StateTier:
    """The tier ``offload`` asks for (None: host memory, as in tests that build a HostStep alone);
    with "nvme", the first chunks up to ``host_share`` of the elements in host memory ([Note: host
    share]): all of them a ``HostTier``, none an ``NvmeTier``, else a ``SplitTier`` of the two.
    ``check_room``: refuse a host part the host cannot hold, before it is allocated ([Note: host room])."""
    if offload is None:
        return HostTier(memory, chunks)
    numel = [sum(shard_sizes[i] for i in chunk) for chunk in chunks]
    per_element = bytes_per_element(optimizer, offload.state_dtype)
    largest = max((shard_sizes[i] for chunk in chunks for i in chunk), default=0)
    # One reading per host ([Note: host room]), a collective: every rank builds its tier, with the same
    # settings. A rebuild with a fixed share needs none.
    hosts = host_room.readings(ctx) if check_room or offload.host_share == "auto" else []
    if offload.device == "cpu":
        if check_room:
            host_room.check(host_room.HostNeed(sum(numel), sum(numel), per_element, largest=largest), hosts, offload)
        return HostTier(memory, chunks)
    share = offload.host_share
    if share == "auto":
        # The tightest host's reading on every rank: one share for all, so all build the same tiers.
        choice = split_tier.auto_share(numel, per_element, offload.buffer_count, host_room.tightest(hosts),
                                       copy_share=DEFAULT_BUDGET)
        split_tier.say(choice, ctx)
        count = split_tier.host_chunks(numel, choice.share, whole=True)  # what it chose, not a chunk more
    else:
        count = split_tier.host_chunks(numel, share)
    # the NVMe side's chunk buffers, as NvmeTier holds them (``buffer_count`` of its largest chunk)
    buffers = offload.buffer_count * per_element * max(numel[count:], default=0) if count < len(chunks) else 0
    if check_room:
        host_room.check(host_room.HostNeed(sum(numel), sum(numel[:count]), per_element, buffers, largest), hosts,
                        offload)
    if count == len(chunks):
        return HostTier(memory, chunks)
    if count == 0:
        return NvmeTier(offload, chunks, shard_sizes, memory, ctx, optimizer)
    nvme = NvmeTier(offload, chunks[count:], shard_sizes, memory, ctx, optimizer)
    return SplitTier(HostTier(memory, chunks[:count]), nvme, chunks, count)
