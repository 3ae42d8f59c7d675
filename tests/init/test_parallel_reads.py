"""``ParallelReader`` (hf_zero/init/parallel_reads.py): ranges read in pieces on several threads
land exactly where asked, cast where the shard's dtype differs, and a file cut short is named.
The GPU path (pinned pieces, copies on the load stream) is tests/gpu/test_sharded_load_gpu.py."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from hf_zero.init import parallel_reads
from hf_zero.init.parallel_reads import ParallelReader


def test_pieces_on_threads_fill_each_range(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel_reads, "PIECE_BYTES", 64)  # 16 fp32 elements a piece: most ranges are many
    values = torch.arange(10_000, dtype=torch.float32)
    path = str(tmp_path / "data")
    values.numpy().tofile(path)
    seen = set()
    original = ParallelReader._to_cpu

    def spy(self, *args):
        seen.add(threading.current_thread().name)
        return original(self, *args)

    monkeypatch.setattr(ParallelReader, "_to_cpu", spy)
    reader = ParallelReader()
    fd = os.open(path, os.O_RDONLY)
    try:
        same = torch.zeros(3000)
        cast = torch.zeros(1001, dtype=torch.float64)
        reader.read(fd, 4 * 7, torch.float32, same, path)  # elements 7 .. 3006
        reader.read(fd, 4 * 8000, torch.float32, cast, path)  # elements 8000 .. 9000, into float64
        reader.drain()
        assert torch.equal(same, values[7:3007]) and torch.equal(cast, values[8000:9001].double())
        assert len(seen) > 1 and all(name.startswith("hf_zero-load") for name in seen), seen
        reader.read(fd, 4 * 9990, torch.float32, torch.zeros(20), path)  # 10 elements past the end: its first piece (16) fails
        with pytest.raises(ValueError, match=r"data: ends before byte 40024 \(cut short\?\)"):
            reader.drain()
    finally:
        reader.close()
        os.close(fd)
