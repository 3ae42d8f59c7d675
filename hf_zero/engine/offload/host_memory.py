"""``HostMemory``: host tensors of the offload tiers, pinned slabs when CUDA can use them.

The host tier of parameter offload (``offload_param.device = "cpu"``) allocates the units' param
shards here; optimizer offload allocates its fp32 masters and grads here (``HostTier``) or its
chunk buffers (``NvmeTier``). The interface it meets is ``tiers.ShardMemory``.
"""

from __future__ import annotations

import torch


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

    # ---- a stage-3 shard's uses (tiers.ShardMemory): the shard is where it is read and written ----

    def stage(self, shard: torch.Tensor) -> torch.Tensor:
        return shard

    def done_with(self, staged: torch.Tensor, device: torch.device) -> None:
        pass

    def read_ahead(self, shard: torch.Tensor) -> None:
        pass

    def drop_read_ahead(self) -> None:
        pass

    def write(self, shard: torch.Tensor, source: torch.Tensor) -> None:
        shard.copy_(source)

    def staging_bytes(self) -> int:
        return 0

    def reserved_bytes(self) -> int:
        return sum(s[0].numel() for s in self._slabs)

    def close(self) -> None:
        self._slabs = []
