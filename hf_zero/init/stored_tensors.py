"""The tensors stored in a checkpoint's weight files, read by byte range or whole.

- ``SafetensorsFiles``: a safetensors tensor is stored row-major and whole, so a run of its flat
  elements is one contiguous byte range of its file, found from the file's JSON header alone;
  ranges are read with ``preadv`` on a few threads (parallel_reads.py). Not
  ``safe_open(...).get_slice``: that maps the file, and the mapped pages it touches count in the
  process's RSS until the file is closed.
- ``BinFiles``: ``pytorch_model*.bin`` files, opened with ``torch.load(weights_only=True,
  mmap=True)`` (safe_reader.torch_load: nothing in them runs; a file with anything but tensors
  and plain containers is refused, naming it), one file at a time: its tensors are views of the
  mapped file, so only the pages a rank copies from are read, and the file is let go of at the
  end of each unit (``drain``) or when a read needs another file.

Both give ``tensors`` (checkpoint key -> ``StoredTensor``), ``read(key, start, end, out)``
(flat elements ``[start, end)`` into ``out``, cast; complete after ``drain``), ``read_whole(key)``
(a CPU tensor, at once), ``unit_queued()`` (a unit's reads are asked for: the safetensors reads
run on while the next unit's are asked for, those of the unit before are complete on return;
[Note: parallel reads]), ``drain()`` and ``close()``. A safetensors file stays open while reads of
it are outstanding, at most two units' files.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import NamedTuple

import torch

from hf_zero.init.checkpoint_files import NotServed
from hf_zero.init.parallel_reads import ParallelReader, pread_into


class StoredTensor(NamedTuple):
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in a safetensors file (-1 in a .bin file)


def open_files(fmt: str, paths) -> "SafetensorsFiles | BinFiles":
    return SafetensorsFiles(paths) if fmt == "safetensors" else BinFiles(paths)


class SafetensorsFiles:
    def __init__(self, paths) -> None:
        self.tensors: dict[str, StoredTensor] = {}
        for path in paths:
            self.tensors.update(read_header(path))
        self._reader = ParallelReader()
        self._fds: dict[str, int] = {}
        self._unit_paths: set[str] = set()  # the files the current unit reads

    def read(self, key: str, start: int, end: int, out: torch.Tensor) -> None:
        t = self.tensors[key]
        size = torch.empty(0, dtype=t.dtype).element_size()
        self._unit_paths.add(t.path)
        self._reader.read(self._fd(t.path), t.offset + start * size, t.dtype, out, t.path)

    def read_whole(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        value = torch.empty(t.shape, dtype=t.dtype)
        pread_into(self._fd(t.path), value, t.offset, t.path)
        return value

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def unit_queued(self) -> None:
        self._reader.unit_queued()  # the unit before's reads are complete: only this unit's files stay open
        for path in [p for p in self._fds if p not in self._unit_paths]:
            os.close(self._fds.pop(path))
        self._unit_paths = set()

    def drain(self) -> None:
        try:
            self._reader.drain()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._unit_paths = set()

    def close(self) -> None:
        self.drain()
        self._reader.close()


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_header(path: str) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file: an 8-byte little-endian header length, a JSON header
    (name -> dtype, shape, data_offsets relative to the data after the header), then the data."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry.get("dtype") not in _DTYPES:
            raise ValueError(f"{path}: tensor {key} has dtype {entry.get('dtype')!r}, which hf_zero's sharded load "
                             f"does not read (one of {sorted(_DTYPES)})")
        out[key] = StoredTensor(path, _DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + n + entry["data_offsets"][0])
    return out


class BinFiles:
    def __init__(self, paths) -> None:
        self.tensors: dict[str, StoredTensor] = {}
        for path in paths:  # one at a time: only its keys, dtypes and shapes are kept
            for key, t in _load(path).items():
                self.tensors[key] = StoredTensor(path, t.dtype, tuple(t.shape), -1)
        self._open: tuple[str, dict] | None = None

    def _tensor(self, key: str) -> torch.Tensor:
        path = self.tensors[key].path
        if self._open is None or self._open[0] != path:
            self._open = None  # the mapping of the file read before goes first
            self._open = (path, _load(path))
        return self._open[1][key]

    def read(self, key: str, start: int, end: int, out: torch.Tensor) -> None:
        out.copy_(self._tensor(key).reshape(-1)[start:end])

    def read_whole(self, key: str) -> torch.Tensor:
        return self._tensor(key).clone()

    def unit_queued(self) -> None:
        self.drain()  # its reads are copies, done when asked for

    def drain(self) -> None:
        self._open = None

    def close(self) -> None:
        self.drain()


def _load(path: str) -> dict[str, torch.Tensor]:
    from hf_zero.checkpoint.safe_reader import torch_load

    if not zipfile.is_zipfile(path):  # torch's legacy format cannot be mapped: transformers reads it whole
        raise NotServed(f"{os.path.basename(path)} is in torch's legacy (non-zip) format")
    loaded = torch_load(path, mmap=True)  # weights only: a pickled payload is refused, naming the file
    bad = next((k for k, v in loaded.items() if not isinstance(v, torch.Tensor)), None) \
        if isinstance(loaded, dict) else type(loaded).__name__
    if bad is not None:
        raise ValueError(f"{path}: not a state dict of tensors ({bad!r} is not a tensor); hf_zero's sharded load "
                         "reads .bin files that map names to tensors, as save_pretrained writes them")
    return loaded
