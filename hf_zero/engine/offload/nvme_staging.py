"""``StagingBuffers``: the few host buffers through which the NVMe parameter tier reads its shards.

[Note: staging] Each use of a stage-3 unit uploads its shards to the device (units.py, [Note: host
shards]). With ``offload_param.device = "nvme"`` a shard is read from its swap file (``pread``,
on the swap directory's I/O threads) into one of ``count`` host buffers, pinned when CUDA is
there, and uploaded from that buffer; the shard's mapped pages are never read on this path. While
unit k is uploaded and computed, unit k+1's read is in flight (``read_ahead``, asked by the unit
hooks' schedule: units.py, [Note: prefetch]):

    buffer 0:  [read k  ][upload k]                 [read k+3] ...
    buffer 1:       [read k+1   ][upload k+1]
    buffer 2:                [read k+2   ][upload k+2]

so the host holds ``count`` x the largest shard file for reading, whatever the model's size.
A buffer's lifecycle is ``BufferState``: FREE -> READING_AHEAD (a read-ahead, not asked for yet)
-> LENT (``stage`` handed it out) -> UPLOADING (``done_with``: the device copy may still read it,
its CUDA event says when not) -> FREE.

[Note: staged versions] A shard can be written while its read-ahead is in flight (the host step
writes a unit's new params while the next forward runs: host_step.py, [Note: step in backward]).
Every write through the tier (``written``, after the bytes are in the file) bumps the file's
version; a read-ahead remembers the version it started at, and ``stage`` reads again when it
changed, so a staged shard is never older than the last write before ``stage``. Writes that do
not go through the tier (through the files' mappings: the sharded load, checkpoint loads, edits in
``gathered``) happen between passes, and the unit hooks drop every read-ahead at the end of each
pass (``drop_read_ahead``).
"""

from __future__ import annotations

import enum
from concurrent.futures import Future

import torch

from hf_zero.engine.offload.nvme_files import BLOCK_BYTES, SwapDir, SwapFile

STAGING_BUFFERS = 3  # one uploading, one read ahead, one spare so a read-ahead need not wait for an upload


class BufferState(enum.Enum):
    FREE = "free"  # holds nothing anyone waits for
    READING_AHEAD = "reading ahead"  # a read-ahead of ``key`` in flight or done, not asked for yet
    LENT = "lent"  # handed out by ``stage``: the caller copies from it
    UPLOADING = "uploading"  # the caller's device copy from it may still run (``event``)


class _Buffer:
    def __init__(self) -> None:
        self.data: torch.Tensor | None = None  # uint8; grows to the largest file it has read
        self.state = BufferState.FREE
        self.key: tuple[int, int, int] | None = None  # (id of the file, byte offset, bytes) it holds
        self.version = -1  # the file's version when its read started
        self.io: list[Future] = []
        self.event = None  # CUDA event after the upload from it (UPLOADING)


class StagingBuffers:
    """``count`` host buffers, reads into them from one ``SwapDir``'s files, and the files' versions."""

    def __init__(self, swap_dir: SwapDir, pin: bool, count: int = STAGING_BUFFERS) -> None:
        if count < 2:
            raise ValueError(f"staging needs at least 2 buffers (one lent, one to read into), got {count}")
        self.dir, self.pin = swap_dir, pin
        self.buffers = [_Buffer() for _ in range(count)]
        self._versions: dict[int, int] = {}  # id(SwapFile) -> writes so far
        self.hits = self.misses = self.stale = 0  # stage(): read ahead and current, read now, read again

    # ---- reading -----------------------------------------------------------------------------------

    def stage(self, file: SwapFile, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of ``file`` at byte ``offset``, current, in a LENT buffer (uint8); give it back with
        ``done_with``."""
        key = (id(file), offset, nbytes)
        buf = next((b for b in self.buffers if b.state is BufferState.READING_AHEAD and b.key == key), None)
        if buf is not None:
            _wait(buf.io)
            if buf.version == self._versions.get(id(file), 0):
                self.hits += 1
            else:  # written while it was read ahead: [Note: staged versions]
                self.stale += 1
                self._read(buf, file, offset, nbytes)
                _wait(buf.io)
        else:
            self.misses += 1
            buf = self._take(block=True)
            self._read(buf, file, offset, nbytes)
            _wait(buf.io)
        buf.io, buf.state = [], BufferState.LENT
        return self._view(buf, offset, nbytes)

    def done_with(self, staged: torch.Tensor, event) -> None:
        """The caller has queued its copy from ``staged`` (``event``: a CUDA event after it, or None
        when the copy is done)."""
        buf = next((b for b in self.buffers if b.state is BufferState.LENT and _inside(staged, b.data)), None)
        if buf is None:
            raise AssertionError("done_with() of a tensor that no staging buffer lent")
        buf.event, buf.state = event, BufferState.UPLOADING if event is not None else BufferState.FREE

    def read_ahead(self, file: SwapFile, offset: int, nbytes: int) -> bool:
        """Start reading ``nbytes`` of ``file`` at ``offset`` into a buffer nobody waits for; never
        blocks (False: none was free, or it is read ahead already)."""
        key = (id(file), offset, nbytes)
        if any(b.state is BufferState.READING_AHEAD and b.key == key for b in self.buffers):
            return False
        buf = self._take(block=False)
        if buf is None:
            return False
        self._read(buf, file, offset, nbytes)
        buf.state = BufferState.READING_AHEAD
        return True

    def drop_read_ahead(self) -> None:
        """Forget every read-ahead (its read finished first: it writes into the buffer)."""
        for buf in self.buffers:
            if buf.state is BufferState.READING_AHEAD:
                _wait(buf.io)
                buf.io, buf.key, buf.state = [], None, BufferState.FREE

    def written(self, file: SwapFile) -> None:
        """``file`` was just written (the bytes are in it): read-aheads of it started before are stale."""
        self._versions[id(file)] = self._versions.get(id(file), 0) + 1

    # ---- buffers -----------------------------------------------------------------------------------

    def _take(self, block: bool) -> _Buffer | None:
        """A buffer to read into: a free one, else one whose upload is over (``block``: waiting for the
        oldest upload, else dropping a read-ahead)."""
        for buf in self.buffers:
            if buf.state is BufferState.FREE:
                return buf
        for buf in self.buffers:
            if buf.state is BufferState.UPLOADING and buf.event.query():
                buf.event, buf.state = None, BufferState.FREE
                return buf
        if not block:
            return None
        for state in (BufferState.UPLOADING, BufferState.READING_AHEAD):
            for buf in self.buffers:
                if buf.state is state:
                    if state is BufferState.UPLOADING:
                        buf.event.synchronize()
                    _wait(buf.io)
                    buf.io, buf.event, buf.key, buf.state = [], None, None, BufferState.FREE
                    return buf
        raise AssertionError(f"every staging buffer is lent ({len(self.buffers)}): done_with() was not called")

    def _read(self, buf: _Buffer, file: SwapFile, offset: int, nbytes: int) -> None:
        """Start reading the whole blocks around [offset, offset + nbytes) into ``buf``."""
        lo, hi = offset // BLOCK_BYTES * BLOCK_BYTES, -(-(offset + nbytes) // BLOCK_BYTES) * BLOCK_BYTES
        if hi > file.nbytes:
            raise AssertionError(f"staging {nbytes} bytes at {offset} of {file.path}: past its {file.nbytes} bytes")
        if buf.data is None or buf.data.numel() < hi - lo:
            buf.data = torch.empty(hi - lo, dtype=torch.uint8, pin_memory=self.pin)
        buf.key, buf.version = (id(file), offset, nbytes), self._versions.get(id(file), 0)
        buf.io = self.dir.read_file(file, buf.data[: hi - lo], lo)
        file.drop_pages()  # pages a cold path touched through the mapping leave this process's RSS

    @staticmethod
    def _view(buf: _Buffer, offset: int, nbytes: int) -> torch.Tensor:
        skip = offset % BLOCK_BYTES
        return buf.data[skip : skip + nbytes]

    def resident_bytes(self) -> int:
        return sum(b.data.numel() for b in self.buffers if b.data is not None)

    def close(self) -> None:
        self.drop_read_ahead()
        for buf in self.buffers:
            if buf.event is not None:
                buf.event.synchronize()
        self.buffers = []


def _inside(t: torch.Tensor, data: torch.Tensor | None) -> bool:
    return data is not None and data.data_ptr() <= t.data_ptr() < data.data_ptr() + data.numel()


def _wait(futures: list[Future]) -> None:
    for f in futures:
        f.result()
