"""``HostMemory``: host tensors of the offload tiers, pinned slabs when CUDA can use them.

The host tier of parameter offload (``offload_param.device = "cpu"``) allocates the units' param
shards here; optimizer offload allocates its fp32 masters and grads here (``HostTier``) or its
chunk buffers (``NvmeTier``). The interface it meets is ``tiers.ShardMemory``.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from hf_zero.engine.offload import cgroup_memory
from hf_zero.engine.offload.glibc_heap import fix_mmap_threshold



def meminfo() -> tuple[int, int] | None:
    """(MemAvailable, MemTotal) of this host in bytes, from /proc/meminfo, each lowered to this
    process's cgroup limit where one holds it ([Note: cgroup limit] in cgroup_memory.py); None
    where there is no /proc/meminfo. What the offload tiers may still take (host_room.py's check,
    speculation.py's copies, split_tier.py's "auto" share)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        got = int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    held = cgroup_memory.limit()
    return got if held is None else (min(got[0], held[0]), min(got[1], held[1]))

class HostMemory:
    """Host tensors for offloaded state (fp32 masters and grads; param shards in the params' dtype
    with parameter offload), pinned when CUDA can use them.

    Pinned memory is carved from slabs of at least ``SLAB_BYTES``: torch's pinned allocator
    rounds every request up to a power of two, so a tensor per bucket would waste up to half of
    the pinned memory (a 7B model's 180 MB MLP shards take 256 MB each), which the host often
    cannot spare. Requests are placed first-fit in the slabs' free tails.

    [Note: freeing host memory] Nothing is freed one tensor at a time unless asked: the masters and
    grads live as long as the layout. A host step that is replaced (``offload_optimizer.ratio``
    "auto" after the first step, a re-layout) hands its grads back with ``free`` when it closes: an
    exact buffer is unregistered and dropped, a slab once every request carved from it is freed.
    Without that the old grads stayed until the old host step was collected, while the new one
    allocated its masters: a 7B "auto" run held 27 GB of old fp32 grads beside its new masters and
    the kernel killed it (bench/results/h100_session19_summary.md).

    [Note: exact pinning] A request of ``SLAB_BYTES`` or more is not rounded at all: it is an
    ordinary host tensor of exactly its size, page-locked in place with ``cudaHostRegister``
    (``torch.cuda.cudart()``), and unregistered at ``close`` or when this object goes. Slabs alone
    lose up to half at large shards: a 13B Llama's stage-3 unit (317 M elements) has a 1.27 GB fp32
    master and grad, each rounded to a 2 GiB slab whose tail no later request of that size fits,
    and a 634 MB bf16 param shard rounded to 1 GiB: 86 GB of 127 GB lost with everything
    offloaded. A registration the driver refuses falls back to a slab, with one warning.
    """

    SLAB_BYTES = 1 << 28  # 256 MiB; requests this large or larger are pinned exactly
    ALIGN = 512
    on_disk = False  # NvmeParamMemory: True

    def __init__(self, pin: bool) -> None:
        fix_mmap_threshold()  # [Note: mmap threshold] (glibc_heap.py): once per process
        self.pin = pin and torch.cuda.is_available()
        self._slabs: list[list] = []  # [uint8 tensor, bytes used, requests not freed]
        self._exact: list[torch.Tensor] = []  # registered in place ([Note: exact pinning])
        self._registered: list[int] = []  # their data pointers, for cudaHostUnregister
        self._warned = False
        self._finalizer = weakref.finalize(self, _unregister, self._registered)

    def empty(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not self.pin:
            return torch.empty(numel, dtype=dtype)
        size = dtype.itemsize
        nbytes = max(self.ALIGN, -(-numel * size // self.ALIGN) * self.ALIGN)
        if nbytes >= self.SLAB_BYTES:
            exact = self._pinned_exact(nbytes)
            if exact is not None:
                return exact.view(dtype)[:numel]
        slab = next((s for s in self._slabs if s[0].numel() - s[1] >= nbytes), None)
        if slab is None:
            size = max(self.SLAB_BYTES, 1 << (nbytes - 1).bit_length())  # what the allocator gives anyway
            slab = [self._pinned_slab(size), 0, 0]
            self._slabs.append(slab)
        out = slab[0][slab[1] : slab[1] + nbytes].view(dtype)[:numel]
        slab[1] += nbytes
        slab[2] += 1
        return out

    def free(self, t: torch.Tensor) -> None:
        """``t`` (from ``empty`` or ``like``) is no longer used: its exact buffer goes now, its slab
        when every request carved from it has gone ([Note: freeing host memory]). Unpinned tensors
        go with their last reference, as any tensor."""
        ptr = t.data_ptr()
        if ptr in self._registered:
            self._registered.remove(ptr)
            _unregister([ptr])
            self._exact = [e for e in self._exact if e.data_ptr() != ptr]
            return
        for k, slab in enumerate(self._slabs):
            start = slab[0].data_ptr()
            if start <= ptr < start + slab[0].numel():
                slab[2] -= 1
                if slab[2] == 0:
                    del self._slabs[k]  # by position: list.remove compares slabs with ==, a tensor op
                return

    def _pinned_slab(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _pinned_exact(self, nbytes: int) -> torch.Tensor | None:
        """``nbytes`` of host memory page-locked in place, or None where the driver refuses."""
        out = torch.empty(nbytes, dtype=torch.uint8)
        error = _register(out.data_ptr(), nbytes)
        if error:
            if not self._warned:
                self._warned = True
                warnings.warn(f"hf_zero: cudaHostRegister of {nbytes} bytes failed (CUDA error {error}); pinned "
                              "offload buffers fall back to torch's pinned allocator, which rounds each to a "
                              "power of two", RuntimeWarning, stacklevel=3)
            return None
        self._exact.append(out)
        self._registered.append(out.data_ptr())
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

    def write_back(self, shard: torch.Tensor) -> None:
        pass  # the shard is host memory itself; NvmeParamMemory writes its file's pages to the disk

    def drop_read_ahead(self) -> None:
        pass

    def write(self, shard: torch.Tensor, source: torch.Tensor) -> None:
        shard.copy_(source)

    def staging_bytes(self) -> int:
        return 0

    def reserved_bytes(self) -> int:
        return sum(s[0].numel() for s in self._slabs) + sum(t.numel() for t in self._exact)

    def close(self) -> None:
        """Let go of the slabs; unregister the exact buffers (a view still held elsewhere reads and
        writes on as ordinary, pageable host memory)."""
        _unregister(self._registered)
        self._slabs, self._exact = [], []


def _register(ptr: int, nbytes: int) -> int:
    """``cudaHostRegister(ptr, nbytes, cudaHostRegisterDefault)``: 0, or the CUDA error code."""
    return _code(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))


def _unregister(pointers: list[int]) -> None:
    """``cudaHostUnregister`` each of ``pointers``, and empty the list (idempotent)."""
    while pointers:
        _code(torch.cuda.cudart().cudaHostUnregister(pointers.pop()))


def _code(result) -> int:
    """A cudart binding's return value (an int, or an enum with ``.value``) as an int."""
    return int(getattr(result, "value", result))
