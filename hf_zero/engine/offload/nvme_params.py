"""Parameter offload to NVMe (stage 3): the units' param shards in swap files.

[Note: host shards] in units.py keeps each unit's param shards in host memory (``HostMemory``);
with ``offload_param.device = "nvme"`` they are carved from ``NvmeParamMemory`` instead: each
shard (a fused unit's shards together) is a file of its own in this rank's swap directory under
``offload_param.nvme_path`` (``nvme_files.SwapDir``: the same naming, clean-up at ``close()``, at
exit and of a crashed run's files), and the tensor the unit keeps is a shared mapping of it.

What runs every step does not touch the mappings:

- the upload before each gather reads the shard with ``pread`` into one of a few pinned staging
  buffers and uploads from there, the next unit's read in flight meanwhile (``stage``,
  ``read_ahead``: nvme_staging.py, [Note: staging]);
- the host step (and a device optimizer's write-back) writes the new params with ``pwrite``,
  cast in pieces of ``REQUEST_BYTES`` (``write``).

So the process's RSS holds the staging buffers, not the shards: the files' pages live in the page
cache, which the kernel can drop. A page a rarer path touched through the mapping leaves the
process's RSS at once where that path wrote the shards ([Note: shards written back]), else (a
sharded checkpoint's save reads the frozen shards so) the next time the shard is staged
(``SwapFile.drop_pages``).
The two ways in stay coherent: on Linux a shared file mapping and ``pread``/``pwrite`` see the
same page cache. The files are read through the page cache, not with O_DIRECT as the optimizer
tier's ([Note: direct I/O] in nvme_files.py): the params' writes are not whole blocks (a fused
unit's frozen shards follow its trainable one in the file), and O_DIRECT moves whole blocks only.

[Note: shards written back] Construction and the sharded load fill the shards through their
mappings: every page of every shard is then in this process's RSS and dirty in the page cache
(a 13B Llama's bf16 shards: 24 GiB), until the first step stages each shard and the kernel gets
round to writing it. A memory cgroup counts both, and the optimizer tiers are sized from what
the host has free right after (host_room.py). So each unit's shards are written to the disk and
dropped from memory as soon as they are filled (``write_back``, ``ParamUnit.write_back_shards``).
The same goes for every other path that writes the shards outside the step:

- construction (``ParamUnit.__init__``) and ``ParamUnit.materialize`` (the sharded load,
  ``from_config``, a PEFT re-layout: hf_zero/init), through the mappings;
- edits kept by ``gathered(modifier_rank=...)`` (full_params.py ``_write_back``; the Trainer's
  ``load_best_model_at_end`` loads the best checkpoint so): frozen parts through the mapping
  (``UnitBuffer.keep_edits``), the trainable part with ``write`` and its master then copied from
  the shard, through the mapping (``ShardedBucket.take_full``); each gathered unit once all are in.

The step's own writes are not (``write``: ``pwrite`` through the page cache, no mapping touched,
and the kernel writes the pages back and may drop them), nor a resume's, which are the same
(``sharded.load`` -> ``sync_params_from_masters`` -> ``ShardedBucket.write_back``).

The directory is checked (exists, writable, room for every rank of the host) before the first
shard is made, with ``offload_param.nvme_path`` named in the error.
"""

from __future__ import annotations

import bisect
import os

import torch

from hf_zero.engine.offload import nvme_files
from hf_zero.engine.offload.nvme_files import BLOCK_BYTES, REQUEST_BYTES, SwapDir, SwapFile
from hf_zero.engine.offload.nvme_staging import StagingBuffers


class NvmeParamMemory:
    """``tiers.ShardMemory`` (``HostMemory``'s interface) over swap files: one file per shard."""

    on_disk = True  # accounting: the shards are counted as NVMe, not host memory

    def __init__(self, nvme_path: str, needed_bytes: int, ctx, pin: bool = True) -> None:
        nvme_files.check_directory(nvme_path, needed_bytes, 0, ctx, key=nvme_files.PARAM_KEY,
                                   what="parameter swap files (each rank's param shards, in the params' dtype)",
                                   less="keep the parameters in host memory (offload_param.device \"cpu\")")
        self.dir = SwapDir(nvme_path, ctx.rank if ctx is not None else 0)
        self.pin = pin and torch.cuda.is_available()
        self.staging = StagingBuffers(self.dir, pin=self.pin)
        self._count = 0
        self._starts: list[int] = []  # mapping addresses of the files, ascending (``_locate``)
        self._files: list[SwapFile] = []

    # ---- making shards (construction, the sharded load) ----------------------------------------------

    def empty(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        nbytes = max(BLOCK_BYTES, -(-numel * dtype.itemsize // BLOCK_BYTES) * BLOCK_BYTES)
        file = self.dir.file(f"param.{self._count}", nbytes // 4)
        self._count += 1
        at = bisect.bisect(self._starts, file.view.data_ptr())
        self._starts.insert(at, file.view.data_ptr())
        self._files.insert(at, file)
        return file.view.view(torch.uint8)[: numel * dtype.itemsize].view(dtype)

    def like(self, src: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = self.empty(src.numel(), dtype).view(src.shape)
        out.copy_(src)
        return out

    def write_back(self, shard: torch.Tensor) -> None:
        """``shard`` was filled through its mapping: to the disk, and out of RSS and the page cache
        ([Note: shards written back])."""
        self._locate(shard)[0].write_back()

    # ---- every step: staged reads, direct writes -----------------------------------------------------

    def stage(self, shard: torch.Tensor) -> torch.Tensor:
        """The current values of ``shard`` in a staging buffer (the same dtype and shape), to copy
        from; hand it back with ``done_with``."""
        file, offset = self._locate(shard)
        staged = self.staging.stage(file, offset, shard.numel() * shard.element_size())
        return staged.view(shard.dtype).view(shard.shape)

    def done_with(self, staged: torch.Tensor, device: torch.device) -> None:
        """The copy from ``staged`` is queued on ``device``'s current stream (or done, off CUDA)."""
        event = None
        if device.type == "cuda" and staged.is_pinned():
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        self.staging.done_with(staged, event)

    def read_ahead(self, shard: torch.Tensor) -> None:
        """Start reading ``shard`` into a free staging buffer, if one is free ([Note: staging])."""
        file, offset = self._locate(shard)
        self.staging.read_ahead(file, offset, shard.numel() * shard.element_size())

    def drop_read_ahead(self) -> None:
        self.staging.drop_read_ahead()

    def write(self, shard: torch.Tensor, source: torch.Tensor) -> None:
        """``shard = source`` (cast to the shard's dtype, from any device), written to its file in
        pieces of ``REQUEST_BYTES``; the shard's read-aheads are stale from now ([Note: staged versions])."""
        file, offset = self._locate(shard)
        flat, step = source.detach().reshape(-1), max(REQUEST_BYTES // shard.element_size(), 1)
        if flat.numel() != shard.numel():
            raise AssertionError(f"writing {flat.numel()} elements into a shard of {shard.numel()}")
        for start in range(0, shard.numel(), step):
            piece = flat[start : start + step].to("cpu", shard.dtype).contiguous()
            _write_all(file, memoryview(piece.view(torch.uint8).numpy()), offset + start * shard.element_size())
        self.staging.written(file)

    def _locate(self, t: torch.Tensor) -> tuple[SwapFile, int]:
        """The file whose mapping ``t`` views, and ``t``'s byte offset in it."""
        at = bisect.bisect_right(self._starts, t.data_ptr()) - 1
        if at >= 0:
            file, offset = self._files[at], t.data_ptr() - self._starts[at]
            if offset + t.numel() * t.element_size() <= file.nbytes:
                return file, offset
        raise AssertionError("a param shard that is not a view of a parameter swap file")

    # ---- accounting and teardown ---------------------------------------------------------------------

    def staging_bytes(self) -> int:
        """Host bytes of the staging buffers: what the tier holds in host memory."""
        return self.staging.resident_bytes()

    def close(self) -> None:
        self.staging.close()
        self.dir.remove()


def _write_all(file: SwapFile, memory: memoryview, offset: int) -> None:
    done = 0
    try:
        while done < len(memory):
            done += os.pwrite(file.fd, memory[done:], offset + done)
    except OSError as error:
        raise OSError(error.errno, f"writing the parameter swap file {file.path} failed: "
                                   f"{error.strerror or error} ({nvme_files.PARAM_KEY})") from error
