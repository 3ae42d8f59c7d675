"""Parameter offload to NVMe (stage 3): the units' param shards in swap files.

[Note: host shards] in units.py keeps each unit's param shards in host memory (``HostMemory``);
with ``offload_param.device = "nvme"`` they are carved from ``NvmeParamMemory`` instead: each
shard is a shared mmap of a file of its own in this rank's swap directory under
``offload_param.nvme_path`` (``nvme_files.SwapDir``: the same naming, clean-up at ``close()``,
at exit and of a crashed run's files). Everything that reads or writes a host shard (the upload
before each gather, the host step's write of the new params, checkpoints, the sharded load) does
so through the mapping, so the kernel moves the pages: read ahead as a unit is uploaded, written
back behind the optimizer step. The shards' pages are file pages, which the kernel can drop,
not process memory; uploads from them are synchronous copies (pageable memory), so a unit's
prefetch overlaps its read with compute only as far as the kernel reads ahead.

The directory is checked (exists, writable, room for every rank of the host) before the first
shard is made, with ``offload_param.nvme_path`` named in the error.
"""

from __future__ import annotations

import torch

from hf_zero.engine.offload import nvme_files
from hf_zero.engine.offload.nvme_files import BLOCK_BYTES, SwapDir


class NvmeParamMemory:
    """``tiers.ShardMemory`` (``HostMemory``'s interface) over swap files: one file per shard."""

    pin = False
    on_disk = True  # accounting: the shards are counted as NVMe, not host memory

    def __init__(self, nvme_path: str, needed_bytes: int, ctx) -> None:
        nvme_files.check_directory(nvme_path, needed_bytes, 0, ctx, key=nvme_files.PARAM_KEY,
                                   what="parameter swap files (each rank's param shards, in the params' dtype)",
                                   less="keep the parameters in host memory (offload_param.device \"cpu\")")
        self.dir = SwapDir(nvme_path, ctx.rank if ctx is not None else 0)
        self._count = 0

    def empty(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        nbytes = max(BLOCK_BYTES, -(-numel * dtype.itemsize // BLOCK_BYTES) * BLOCK_BYTES)
        file = self.dir.file(f"param.{self._count}", nbytes // 4)
        self._count += 1
        return file.view.view(torch.uint8)[: numel * dtype.itemsize].view(dtype)

    def like(self, src: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = self.empty(src.numel(), dtype).view(src.shape)
        out.copy_(src)
        return out

    def close(self) -> None:
        self.dir.remove()
