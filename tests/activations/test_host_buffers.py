"""HostBuffers (the host memory of CPU checkpointing) and CheckpointOffload's record lifecycle, on CPU."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from hf_zero.activations.checkpoint_offload import CheckpointOffload, Residence
from hf_zero.activations.host_buffers import HostBuffers


def test_buffers_are_reused_by_size():
    buffers = HostBuffers(pin=False, slots=None, contiguous=False)
    a, b = buffers.acquire(1000), buffers.acquire(1000)
    assert a.numel() == 1024 and buffers.allocations == 2  # rounded up to 512-byte multiples
    buffers.release(a)
    assert buffers.acquire(900) is a and buffers.allocations == 2  # same rounded size: the free one
    buffers.release(b)
    c = buffers.acquire(5000)
    assert c is not b and buffers.allocations == 3 and buffers.pinned_bytes == 1024 * 2 + 5120


def test_slots_bound_the_buffers_and_the_rest_overflow_once_warned():
    buffers = HostBuffers(pin=False, slots=2, contiguous=False)
    kept = [buffers.acquire(512), buffers.acquire(512)]
    with pytest.warns(UserWarning, match="number_checkpoints = 2"):
        extra = buffers.acquire(512)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        buffers.acquire(512)
    assert again == []  # warned once only
    assert buffers.overflows == 2 and buffers.allocations == 2
    buffers.release(extra)  # pageable: not kept
    assert buffers.pinned_bytes == 1024
    buffers.release(kept[0])
    big = buffers.acquire(4096)  # the free 512-byte buffer makes room for another size
    assert big.numel() == 4096 and buffers.allocations == 3 and buffers.pinned_bytes == 512 + 4096


def test_contiguous_arena_has_slots_and_regrows_only_when_all_are_free():
    buffers = HostBuffers(pin=False, slots=3, contiguous=True)
    a = buffers.acquire(1000)
    assert buffers.pinned_bytes == 3 * 1024 and buffers.allocations == 3
    b = buffers.acquire(1024)
    assert a.data_ptr() + 1024 == b.data_ptr() or b.data_ptr() + 1024 == a.data_ptr()  # slices of one arena
    with pytest.warns(UserWarning, match="larger than an arena slot"):
        buffers.acquire(2048)  # larger than a slot while slots are in use: pageable
    buffers.release(a)
    buffers.release(b)
    buffers.acquire(2048)  # all free: the arena is allocated again at the new size
    assert buffers.pinned_bytes == 3 * 2048 and buffers.allocations == 6


def test_contiguous_needs_slots():
    with pytest.raises(ValueError, match="number_checkpoints"):
        HostBuffers(pin=False, slots=None, contiguous=True)


def test_records_go_host_prefetched_returned_and_free_their_buffer():
    """Three checkpoints: backward unpacks the last first, which prefetches the one before it; every
    record's buffer is back in HostBuffers once autograd has dropped the graph."""
    buffers = HostBuffers(pin=False, slots=None, contiguous=False)
    offload = CheckpointOffload("cpu", buffers)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    h = x
    with offload:
        for _ in range(3):
            h = checkpoint(lambda t: torch.tanh(lin(t)), h, use_reentrant=False)
    records = [r() for r in offload._order]
    assert [r.state for r in records] == [Residence.ON_HOST] * 3 and offload.counts.packed == 3
    want = torch.autograd.grad(_plain(lin, x), x)[0]
    got = torch.autograd.grad(h.sum(), x)[0]
    assert torch.equal(got, want)
    assert offload.counts.unpacked == 3 and offload.counts.prefetched == 2
    del records, h
    gc.collect()
    assert buffers._in_use == 0 and len(buffers._free[512]) == 3  # all three buffers free for the next forward


def _plain(lin, x):
    h = x
    for _ in range(3):
        h = torch.tanh(lin(h))
    return h.sum()
