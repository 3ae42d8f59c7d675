"""HostMemory's pinned allocations ([Note: exact pinning] in engine/offload/host_memory.py): large
requests are page-locked in place at their exact size instead of rounded up to a power-of-two
slab, and a driver that refuses falls back to the slabs.

No CUDA here: the CUDA calls (``_register``/``_unregister``, torch's pinned slab) are replaced by
recorders, so what is tested is the bookkeeping: which request goes where, how many bytes are
reserved, and that every registration is undone once."""

from __future__ import annotations

import gc

import pytest
import torch

from hf_zero.engine.offload import host_memory
from hf_zero.engine.offload.host_memory import HostMemory

MiB = 1 << 20


class _Recorder:
    def __init__(self, error: int = 0):
        self.error, self.registered, self.unregistered = error, [], []

    def register(self, ptr, nbytes):
        self.registered.append((ptr, nbytes))
        return self.error

    def unregister(self, pointers):
        self.unregistered.extend(pointers)
        pointers.clear()


class _Pinned(HostMemory):
    """HostMemory as on a CUDA machine, its slabs ordinary tensors."""

    def __init__(self):
        super().__init__(pin=False)
        self.pin = True
        self.slabs = []

    def _pinned_slab(self, nbytes):
        self.slabs.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)


@pytest.fixture
def cuda_calls(monkeypatch):
    calls = _Recorder()
    monkeypatch.setattr(host_memory, "_register", calls.register)
    monkeypatch.setattr(host_memory, "_unregister", calls.unregister)
    return calls


def test_large_requests_are_pinned_at_their_exact_size(cuda_calls):
    mem = _Pinned()
    # Like a stage-3 unit's: master and grad fp32, param shard bf16, each at least SLAB_BYTES and
    # just above a power of two: exactly their (512-byte aligned) size, no power-of-two slab.
    # (Never written whole: the pages of torch.empty stay untouched.)
    numel = HostMemory.SLAB_BYTES // 2 + 1000
    master, grad = mem.empty(numel), mem.empty(numel)
    shard = mem.empty(numel, torch.bfloat16)
    assert (master.numel(), grad.numel(), shard.numel()) == (numel, numel, numel)
    assert shard.dtype == torch.bfloat16
    exact = [-(-numel * 4 // 512) * 512] * 2 + [-(-numel * 2 // 512) * 512]
    assert [n for _, n in cuda_calls.registered] == exact
    assert mem.slabs == []
    assert mem.reserved_bytes() == sum(exact)  # slabs: 1 GiB + 1 GiB + 512 MiB for these 1.34 GB
    assert [p for p, _ in cuda_calls.registered] == [master.data_ptr(), grad.data_ptr(), shard.data_ptr()]
    master[:1000].fill_(1.0)  # ordinary host memory, writable
    # Small requests still share a slab.
    a, b = mem.empty(1000), mem.empty(1000)
    assert mem.slabs == [HostMemory.SLAB_BYTES] and b.data_ptr() - a.data_ptr() == 4096
    mem.close()
    assert sorted(cuda_calls.unregistered) == sorted(p for p, _ in cuda_calls.registered)
    mem.close()  # idempotent: nothing is unregistered twice
    assert len(cuda_calls.unregistered) == 3


def test_registrations_are_undone_when_the_memory_goes(cuda_calls):
    mem = _Pinned()
    mem.empty(HostMemory.SLAB_BYTES // 4)
    ptr = cuda_calls.registered[0][0]
    del mem
    gc.collect()
    assert cuda_calls.unregistered == [ptr]


def test_a_refused_registration_falls_back_to_slabs_with_one_warning(monkeypatch):
    calls = _Recorder(error=700)
    monkeypatch.setattr(host_memory, "_register", calls.register)
    monkeypatch.setattr(host_memory, "_unregister", calls.unregister)
    mem = _Pinned()
    with pytest.warns(RuntimeWarning, match="cudaHostRegister of .* failed .*power of two") as record:
        mem.empty(HostMemory.SLAB_BYTES // 4 + 1)
        mem.empty(HostMemory.SLAB_BYTES // 4 + 1)
    assert len(record) == 1
    assert mem.slabs == [2 * HostMemory.SLAB_BYTES] * 2  # rounded up, as torch's pinned allocator would
    mem.close()
    assert calls.unregistered == []


def test_unpinned_memory_is_never_registered(cuda_calls):
    mem = HostMemory(pin=False)
    t = mem.empty(HostMemory.SLAB_BYTES)
    assert t.numel() == HostMemory.SLAB_BYTES and cuda_calls.registered == []


def test_free_gives_back_exact_buffers_at_once_and_slabs_when_empty(cuda_calls):
    # [Note: freeing host memory]: a replaced host step hands its grads back
    mem = _Pinned()
    big = mem.empty(HostMemory.SLAB_BYTES // 4 + 1000)  # exact
    a, b = mem.empty(1000), mem.empty(1000)  # one slab
    before = mem.reserved_bytes()
    mem.free(big)
    assert cuda_calls.unregistered == [big.data_ptr()]
    assert mem.reserved_bytes() == before - (-(-big.numel() * 4 // 512) * 512)
    mem.free(a)
    assert mem.reserved_bytes() == HostMemory.SLAB_BYTES  # b still uses the slab
    mem.free(b)
    assert mem.reserved_bytes() == 0
    mem.close()
    assert cuda_calls.unregistered == [big.data_ptr()]  # nothing twice


def test_free_gives_back_a_slab_that_is_not_the_first(cuda_calls):
    # Session 20's 7B "auto" run: freeing the grads of a replaced host step crashed in list.remove,
    # which compared the slabs' tensors with == once the emptied slab was not the first.
    mem = _Pinned()
    n = HostMemory.SLAB_BYTES // 4 - 1024  # fills most of a slab, below the exact size
    first, second, third = mem.empty(n), mem.empty(n), mem.empty(n)
    assert mem.reserved_bytes() == 3 * HostMemory.SLAB_BYTES
    mem.free(second)
    assert mem.reserved_bytes() == 2 * HostMemory.SLAB_BYTES
    mem.free(third)
    mem.free(first)
    assert mem.reserved_bytes() == 0
