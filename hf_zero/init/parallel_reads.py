"""Byte ranges of checkpoint files read by a few threads at once, straight into a rank's shards.

[Note: parallel reads]
One thread reading a file with ``preadv`` gets far less than the disk or the page cache can give
(one request in flight; on the GPU path the copy to the device waits behind each read). So the
reads of a unit are split into pieces of at most ``PIECE_BYTES`` and handed to ``READ_THREADS``
threads (``preadv`` releases the GIL).

Across units: ``unit_queued`` (after a unit's reads are asked for) waits only for the unit
before it, so the next unit's reads are queued behind this one's while they run, and the threads
never stand idle at a unit boundary (the last pieces of a unit, the next unit's zero fill and
requests); ``drain`` waits for everything. At most two units' reads are ever outstanding, and
what they hold is bounded all the same: the requests queue as small records pointing into shards
that exist anyway, and the buffers are the pool's (GPU) or one piece per running thread (a cast
on the CPU)::

      threads:   unit k's pieces ... | unit k+1's pieces ...       (no gap)
      caller:    ask unit k | ask unit k+1, wait for unit k | ask unit k+2, wait for unit k+1 ...

- CPU shards: each piece is read straight into its slice of the shard (or, when the shard's
  dtype differs from the file's, into a piece-sized buffer that is then cast into it).
- GPU shards: each piece is read into a pinned buffer taken from a small pool (two per thread),
  and its copy to the GPU is queued on the load stream at once; the buffer goes back to the pool
  and is reused only after its copy's event. So reads of later pieces overlap the copies of
  earlier ones, and the pinned memory in use is bounded by the pool::

      thread 0:  read p0 | read p2 | read p4 ...
      thread 1:  read p1 | read p3 | read p5 ...
      load stream:    copy p0 | copy p1 | copy p2 | copy p3 ...

  The load stream waits first for the work queued on the caller's stream when the read was asked
  for (the shard's zero fill for its padding), so a copy never lands before it.

Each rank reads only the ranges it is given (its own shard's elements); nothing is mapped, so the
page cache is not counted in the process's RSS.
"""

from __future__ import annotations

import queue
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from hf_zero.engine.offload.nvme_files import read_exactly

READ_THREADS = 4  # reads in flight per rank (transformers' loader uses 4 threads too)
PIECE_BYTES = 32 << 20  # the largest single request; also the size of each pinned buffer
OVERLAP_UNITS = True  # False: ``unit_queued`` waits for everything, as ``drain`` (for bench/lazy_load.py's A/B)


class ParallelReader:
    """Reads byte ranges of open files into CPU or GPU tensors on ``READ_THREADS`` threads.

    ``read`` queues a range; ``unit_queued`` ends a unit's ranges and waits for the unit's before
    (re-raising its first failure); ``drain`` waits for every range queued so far; ``close`` lets
    go of the threads and pinned buffers."""

    def __init__(self) -> None:
        self.threads, self.piece_bytes = READ_THREADS, PIECE_BYTES
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []  # the current unit's pieces
        self._running: list[Future] = []  # the unit before's, left running by ``unit_queued``
        self._staging: _PinnedPool | None = None  # made at the first read onto a GPU

    def read(self, fd: int, offset: int, dtype: torch.dtype, out: torch.Tensor, path: str) -> None:
        """Fill ``out`` (1-D, contiguous) with ``out.numel()`` elements of ``dtype`` stored from byte
        ``offset`` of the open file ``fd`` (named ``path`` in errors), cast to ``out``'s dtype."""
        size = torch.empty(0, dtype=dtype).element_size()
        step = max(1, self.piece_bytes // size)
        ready = None
        if out.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()  # what the caller's stream queued into ``out`` before (its zero fill)
            if self._staging is None:
                self._staging = _PinnedPool(2 * self.threads, self.piece_bytes)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hf_zero-load")
        for a in range(0, out.numel(), step):
            b = min(out.numel(), a + step)
            task = self._to_gpu if ready is not None else self._to_cpu
            self._pending.append(self._pool.submit(task, fd, offset + a * size, dtype, out[a:b], path, ready))

    def unit_queued(self) -> None:
        """The current unit's ranges are all asked for: leave them running, wait for the unit's before
        (its copies to the GPU stay queued on the load stream: ``drain`` waits for those)."""
        if not OVERLAP_UNITS:
            self.drain()
            return
        earlier, self._running, self._pending = self._running, self._pending, []
        _wait(earlier)

    def drain(self) -> None:
        """Wait for every queued range (their copies to the GPU included)."""
        pending, self._running, self._pending = self._running + self._pending, [], []
        try:
            _wait(pending)
        finally:
            if self._staging is not None:
                self._staging.drain()

    def close(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._staging = None

    # ---- one piece (on a reader thread) ----------------------------------------------------------

    def _to_cpu(self, fd: int, offset: int, dtype: torch.dtype, out: torch.Tensor, path: str, ready) -> None:
        direct = out.dtype == dtype and out.is_contiguous()
        dest = out if direct else torch.empty(out.numel(), dtype=dtype)
        pread_into(fd, dest, offset, path)
        if not direct:
            out.copy_(dest)

    def _to_gpu(self, fd: int, offset: int, dtype: torch.dtype, out: torch.Tensor, path: str, ready) -> None:
        staging = self._staging
        slot = staging.take()
        try:
            buf = slot.buffer[: out.numel() * torch.empty(0, dtype=dtype).element_size()].view(dtype)
            pread_into(fd, buf, offset, path)
            with torch.cuda.stream(staging.stream):
                staging.stream.wait_event(ready)
                out.copy_(buf, non_blocking=True)
                slot.event = torch.cuda.Event()
                slot.event.record(staging.stream)
        finally:
            staging.give(slot)


def _wait(futures: list[Future]) -> None:
    """Wait for every one of ``futures``, then raise the first failure among them."""
    first = None
    for future in futures:
        error = future.exception()
        first = first or error
    if first is not None:
        raise first


class _Slot:
    def __init__(self, nbytes: int) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.event = None  # the copy out of ``buffer`` last queued


class _PinnedPool:
    """Pinned buffers shared by the reader threads, and the load stream their copies run on."""

    def __init__(self, count: int, nbytes: int) -> None:
        self.stream = torch.cuda.Stream()  # the load stream: host-to-device copies of pieces read
        self._slots = [_Slot(nbytes) for _ in range(count)]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for slot in self._slots:
            self._free.put(slot)

    def take(self) -> _Slot:
        slot = self._free.get()
        if slot.event is not None:
            slot.event.synchronize()  # its last copy is done: the buffer may be overwritten
        return slot

    def give(self, slot: _Slot) -> None:
        self._free.put(slot)

    def drain(self) -> None:
        for slot in self._slots:
            if slot.event is not None:
                slot.event.synchronize()


def pread_into(fd: int, dest: torch.Tensor, offset: int, path: str) -> None:
    """Fill ``dest`` (contiguous, CPU) with the file's bytes from ``offset``: straight into its
    memory, through the page cache, no mapping (mapped pages would count in the RSS)."""
    view = memoryview(dest.view(torch.uint8).numpy()) if dest.numel() else memoryview(b"")
    if read_exactly(fd, view, offset) < len(view):
        raise ValueError(f"{path}: ends before byte {offset + len(view)} (cut short?)")
