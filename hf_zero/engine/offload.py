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

Not yet: the NVMe tier, parameter offload (stage 3), and overlapping the host step with
backward or the next forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimizerOffload:
    """Where the optimizer of offloaded buckets runs: ``device`` "cpu" (the only tier built)."""

    device: str = "cpu"
    pin_memory: bool = True
    ratio: float = 1.0  # fraction of the optimizer state's elements on the host, in (0, 1]
    chunk_numel: int = 1 << 26  # host-step pipeline granularity (host_step.py): elements per chunk

    def __post_init__(self) -> None:
        if self.device != "cpu":
            raise ValueError(f"optimizer offload to {self.device!r} is not built; only 'cpu'")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"offload ratio must be in (0, 1], got {self.ratio}")

    def offloaded(self, shard_sizes: list[int]) -> list[bool]:
        """Which buckets (by their shard sizes, in bucket order) keep their optimizer on the host:
        the first ones until ``ratio`` of all elements is reached."""
        total, acc, out = sum(shard_sizes), 0, []
        for size in shard_sizes:
            out.append(acc < self.ratio * total)
            acc += size
        return out


class HostMemory:
    """fp32 host tensors for offloaded buckets (masters, grads), pinned when CUDA can use them.

    Pinned memory is carved from slabs of at least ``SLAB_BYTES``: torch's pinned allocator
    rounds every request up to a power of two, so a tensor per bucket would waste up to half of
    the pinned memory (a 7B model's 180 MB MLP shards take 256 MB each), which the host often
    cannot spare. Requests are placed first-fit in the slabs' free tails."""

    SLAB_BYTES = 1 << 28  # 256 MiB
    ALIGN = 512

    def __init__(self, pin: bool) -> None:
        self.pin = pin and torch.cuda.is_available()
        self._slabs: list[list] = []  # [uint8 tensor, bytes used]

    def empty(self, numel: int) -> torch.Tensor:
        if not self.pin:
            return torch.empty(numel, dtype=torch.float32)
        nbytes = max(self.ALIGN, -(-numel * 4 // self.ALIGN) * self.ALIGN)
        slab = next((s for s in self._slabs if s[0].numel() - s[1] >= nbytes), None)
        if slab is None:
            size = max(self.SLAB_BYTES, 1 << (nbytes - 1).bit_length())  # what the allocator gives anyway
            slab = [torch.empty(size, dtype=torch.uint8, pin_memory=True), 0]
            self._slabs.append(slab)
        out = slab[0][slab[1] : slab[1] + nbytes].view(torch.float32)[:numel]
        slab[1] += nbytes
        return out

    def like(self, src: torch.Tensor) -> torch.Tensor:
        """A host fp32 copy of ``src``."""
        out = self.empty(src.numel()).view(src.shape)
        out.copy_(src)
        return out

    def reserved_bytes(self) -> int:
        return sum(s[0].numel() for s in self._slabs)
