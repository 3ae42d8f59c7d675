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


def _gated(monkeypatch, gates: dict):
    """``_to_cpu`` that holds each piece until the gate of its offset is opened (at most 10 s)."""
    original = ParallelReader._to_cpu

    def held(self, fd, offset, *args):
        if not gates[offset].wait(10):
            raise TimeoutError(f"gate {offset} never opened")
        return original(self, fd, offset, *args)

    monkeypatch.setattr(ParallelReader, "_to_cpu", held)


def test_unit_queued_leaves_the_unit_running_and_waits_for_the_unit_before(tmp_path, monkeypatch):
    """[Note: parallel reads]: the next unit's reads are asked for while this unit's still run;
    ``unit_queued`` waits for the unit before (and raises its failure), ``drain`` for all."""
    values = torch.arange(3000, dtype=torch.float32)
    path = str(tmp_path / "data")
    values.numpy().tofile(path)
    gates = {0: threading.Event(), 4000: threading.Event(), 8000: threading.Event()}
    _gated(monkeypatch, gates)
    reader = ParallelReader()
    fd = os.open(path, os.O_RDONLY)
    try:
        a, b, c = torch.zeros(1000), torch.zeros(1000), torch.zeros(1000)
        reader.read(fd, 0, torch.float32, a, path)
        reader.unit_queued()  # returns with unit a's read held: nothing before it
        reader.read(fd, 4000, torch.float32, b, path)
        waiting = threading.Thread(target=reader.unit_queued)
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive()  # unit a is still held
        gates[0].set()
        waiting.join(10)
        assert not waiting.is_alive() and torch.equal(a, values[:1000])
        assert not b.any()  # unit b still held, its call returned
        reader.read(fd, 8000, torch.float32, c, path)
        gates[4000].set()
        gates[8000].set()
        reader.drain()
        assert torch.equal(b, values[1000:2000]) and torch.equal(c, values[2000:])
    finally:
        for gate in gates.values():
            gate.set()
        reader.close()
        os.close(fd)


def test_a_failed_read_is_raised_by_the_next_unit_queued(tmp_path):
    values = torch.arange(100, dtype=torch.float32)
    path = str(tmp_path / "data")
    values.numpy().tofile(path)
    reader = ParallelReader()
    fd = os.open(path, os.O_RDONLY)
    try:
        reader.read(fd, 4 * 90, torch.float32, torch.zeros(20), path)  # 10 elements past the end
        reader.unit_queued()
        reader.read(fd, 0, torch.float32, torch.zeros(10), path)
        with pytest.raises(ValueError, match=r"data: ends before byte 440 \(cut short\?\)"):
            reader.unit_queued()
    finally:
        reader.close()
        os.close(fd)


def _open_paths() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return found


def test_safetensors_files_stay_open_only_while_their_reads_are_outstanding(tmp_path):
    from safetensors.torch import save_file

    from hf_zero.init.stored_tensors import SafetensorsFiles

    first, second = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file({"x": torch.arange(50, dtype=torch.float32)}, first)
    save_file({"y": torch.arange(50, 90, dtype=torch.float32)}, second)
    store = SafetensorsFiles([first, second])
    try:
        x, y = torch.zeros(20), torch.zeros(10)
        store.read("x", 5, 25, x)
        store.unit_queued()
        assert first in _open_paths()  # its read may still run
        store.read("y", 0, 10, y)
        store.unit_queued()  # x's unit is done: its file is closed, y's stays open
        assert first not in _open_paths() and second in _open_paths()
        store.drain()
        assert second not in _open_paths()
        assert torch.equal(x, torch.arange(5, 25, dtype=torch.float32)) and torch.equal(y, torch.arange(50, 60.0))
    finally:
        store.close()
