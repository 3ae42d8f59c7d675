"""Optimizer offload: fp32 master shards, optimizer state and the optimizer step on the host.

With ``offload_optimizer.device = "cpu"`` the buckets chosen by ``OptimizerOffload.offloaded``
keep their fp32 master shard in host memory (pinned when CUDA is there), so the optimizer
creates its state there too and steps on the CPU (``torch.optim.AdamW(fused=True)`` has a fused
CPU kernel). Per step, for each offloaded bucket:

    reduce-scatter (device) -> copy main grad shard down (during backward) -> clip scale
    -> optimizer step (host) -> copy master shard up, cast to the param dtype on the device
    -> all-gather (stages 1-2) or the next forward's gather (stage 3)

pipelined as host_step.py describes. The device keeps only the param shards and, during
backward, a bounded number of gradient buckets. ``ratio`` (any stage; DeepSpeed allows it at
stage 3 only) offloads only that fraction of the optimizer state, counted in elements, bucket
by bucket; the rest stays on the device and is stepped there while the host steps the rest.

With ``device = "nvme"`` the masters and the optimizer's per-element state of those buckets live
in swap files under ``nvme_path`` instead (``nvme_swap.py``); the host keeps their grads and a
few chunk-sized buffers, through which the host step streams each chunk: read, step, write.

The tier is behind one small interface (``Tier``): ``HostTier`` here, ``NvmeTier`` in
``nvme_swap.py``; ``host_step.py`` calls it around each chunk's step.

Parameter offload (``ParamOffload``, stage 3, ``offload_param.device = "cpu"``) keeps each unit's
param shards in host memory too (units.py, [Note: host shards]); the host step then writes the
updated params into those host shards (a cast on the CPU) instead of uploading them.

With ``offload_param.device = "nvme"`` the shards are views of swap files instead (nvme_params.py).

Without clipping the host step runs during backward and on into the next forward (host_step.py,
[Note: step in backward]; step_overlap.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

TIERS = ("cpu", "nvme")


@dataclass(frozen=True)
class OptimizerOffload:
    """Where the optimizer of offloaded buckets runs (on the host, always) and where its masters
    and state live between steps: ``device`` "cpu" (host memory) or "nvme" (files in ``nvme_path``)."""

    device: str = "cpu"
    pin_memory: bool = True
    ratio: float = 1.0  # fraction of the optimizer state's elements on the host, in (0, 1]
    chunk_numel: int = 1 << 26  # host-step pipeline granularity (host_step.py): elements per chunk
    nvme_path: str | None = None  # "nvme": the directory that holds this run's swap directory
    buffer_count: int = 4  # "nvme": chunk buffers in host memory (reading ahead, stepping, writing back)

    def __post_init__(self) -> None:
        if self.device not in TIERS:
            raise ValueError(f"optimizer offload device must be one of {TIERS}, got {self.device!r}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"offload ratio must be in (0, 1], got {self.ratio}")
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("optimizer offload to 'nvme' needs nvme_path (a directory)")
        if self.buffer_count < 1:
            raise ValueError(f"buffer_count must be >= 1, got {self.buffer_count}")

    def offloaded(self, shard_sizes: list[int]) -> list[bool]:
        """Which buckets (by their shard sizes, in bucket order) keep their optimizer on the host:
        the first ones until ``ratio`` of all elements is reached."""
        total, acc, out = sum(shard_sizes), 0, []
        for size in shard_sizes:
            out.append(acc < self.ratio * total)
            acc += size
        return out


@dataclass(frozen=True)
class ParamOffload:
    """Stage 3: the units' param shards live off the device between uses: in host memory
    (``device`` "cpu"), pinned when ``pin_memory`` and CUDA is there, or in swap files under
    ``nvme_path`` (``device`` "nvme", nvme_params.py); each use uploads the shard and gathers
    from the copy."""

    device: str = "cpu"
    pin_memory: bool = True
    nvme_path: str | None = None

    def __post_init__(self) -> None:
        if self.device not in TIERS:
            raise ValueError(f"parameter offload device must be one of {TIERS}, got {self.device!r}")
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("parameter offload to 'nvme' needs nvme_path (a directory)")

    def memory(self, model, ctx):
        """Where the shards go: ``HostMemory``, or ``NvmeParamMemory`` (its directory checked for
        room now: at most the model's params over the ranks, and a block per module for rounding)."""
        if self.device == "cpu":
            return HostMemory(self.pin_memory)
        from hf_zero.engine.nvme_files import BLOCK_BYTES
        from hf_zero.engine.nvme_params import NvmeParamMemory

        world = ctx.world_size if ctx is not None else 1
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        holders = sum(1 for m in model.modules() if next(m.parameters(recurse=False), None) is not None)
        return NvmeParamMemory(self.nvme_path, -(-params // world) + 2 * BLOCK_BYTES * holders, ctx)


class HostMemory:
    """Host tensors for offloaded state (fp32 masters and grads; param shards in the params' dtype
    with parameter offload), pinned when CUDA can use them.

    Pinned memory is carved from slabs of at least ``SLAB_BYTES``: torch's pinned allocator
    rounds every request up to a power of two, so a tensor per bucket would waste up to half of
    the pinned memory (a 7B model's 180 MB MLP shards take 256 MB each), which the host often
    cannot spare. Requests are placed first-fit in the slabs' free tails."""

    SLAB_BYTES = 1 << 28  # 256 MiB
    ALIGN = 512
    on_disk = False  # NvmeParamMemory: True

    def __init__(self, pin: bool) -> None:
        self.pin = pin and torch.cuda.is_available()
        self._slabs: list[list] = []  # [uint8 tensor, bytes used]

    def empty(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not self.pin:
            return torch.empty(numel, dtype=dtype)
        size = dtype.itemsize
        nbytes = max(self.ALIGN, -(-numel * size // self.ALIGN) * self.ALIGN)
        slab = next((s for s in self._slabs if s[0].numel() - s[1] >= nbytes), None)
        if slab is None:
            size = max(self.SLAB_BYTES, 1 << (nbytes - 1).bit_length())  # what the allocator gives anyway
            slab = [torch.empty(size, dtype=torch.uint8, pin_memory=True), 0]
            self._slabs.append(slab)
        out = slab[0][slab[1] : slab[1] + nbytes].view(dtype)[:numel]
        slab[1] += nbytes
        return out

    def like(self, src: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A host copy of ``src`` in ``dtype`` (fp32 unless told)."""
        out = self.empty(src.numel(), dtype).view(src.shape)
        out.copy_(src)
        return out

    def reserved_bytes(self) -> int:
        return sum(s[0].numel() for s in self._slabs)

    def close(self) -> None:
        self._slabs = []


class Tier(Protocol):
    """Where offloaded masters and optimizer state live between host steps (host_step.py).

    Per step: ``begin``; per chunk ``fetch`` (its masters and state where the step reads them),
    the chunk's step and upload, ``release`` (back where they live); ``finish`` once all are."""

    on_disk: bool  # masters and state outside the step are file pages (accounting)

    def master(self, i: int, shard: torch.Tensor) -> torch.Tensor: ...
    def begin(self, optimizer: torch.optim.Optimizer, pieces_of: dict[int, list]) -> None: ...
    def fetch(self, c: int, masters: list[torch.Tensor]) -> dict[int, torch.Tensor]: ...
    def release(self, c: int, uploaded) -> None: ...
    def finish(self) -> None: ...
    def resident_bytes(self) -> int: ...
    def close(self) -> None: ...


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

    def close(self) -> None:
        pass


def make_tier(offload: OptimizerOffload | None, chunks: list[list[int]], shard_sizes: list[int],
              memory: HostMemory, ctx=None, optimizer=None) -> Tier:
    """The tier ``offload`` asks for (None: host memory, as in tests that build a HostStep alone)."""
    if offload is None or offload.device == "cpu":
        return HostTier(memory, chunks)
    from hf_zero.engine.nvme_swap import NvmeTier

    return NvmeTier(offload, chunks, shard_sizes, memory, ctx, optimizer)
