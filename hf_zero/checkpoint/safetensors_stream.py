"""Write safetensors files one tensor at a time, and cut a model into HF's numbered shards.

``safetensors.torch.save_file`` takes every tensor of a file at once; a consolidated checkpoint
of a model larger than host memory cannot be built that way. The format is simple (an 8-byte
little-endian header length, a JSON header with each tensor's dtype, shape and byte range, then
the raw bytes in order), and every tensor's dtype and shape are known before any is read, so
the header is written first and each tensor's bytes are written at their offset as they arrive,
in any order (a stage-3 save gathers unit by unit, not in file order). Files written here are
read back with ``safetensors`` itself in the tests; with ``safetensors_order`` the files are byte
for byte what ``safetensors.torch.save_file`` writes for the same tensors.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from hf_zero.checkpoint.atomic import temp_path

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
# The order in which ``safetensors`` lays out a file's data: by dtype (its Rust enum, descending),
# then by name. Only the byte layout depends on it; readers look tensors up by name.
_SAFETENSORS_RANK = {d: i for i, d in enumerate(["I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL"])}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def file_size(specs: list[TensorSpec]) -> int:
    """The bytes of the safetensors file ``StreamingWriter`` writes for ``specs``."""
    return 8 + len(_header(specs)) + sum(s.nbytes for s in specs)


def _header(specs: list[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": _DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned


class StreamingWriter:
    """One safetensors file whose tensors (``specs``: the data laid out in this order) are written
    one by one, in any order; the file appears under its name only once every tensor is in.

    ``temp``: where to write it instead, leaving it there at ``close()`` (a ``Swap`` of several
    files renames them together, atomic.py); by default a hidden name beside ``path``, renamed to
    ``path`` at ``close()``."""

    def __init__(self, path: str, specs: list[TensorSpec], *, temp: str | None = None) -> None:
        for s in specs:
            if s.dtype not in _DTYPES:
                raise ValueError(f"{s.name}: dtype {s.dtype} cannot be written to safetensors here")
        self.path, self.specs = path, specs
        offsets, offset = {}, 0
        for s in specs:
            offsets[s.name] = (s, offset)
            offset += s.nbytes
        raw = _header(specs)
        self._rename = temp is None
        self._tmp = temp if temp is not None else temp_path(os.path.dirname(path), os.path.basename(path))
        self._file = open(self._tmp, "wb")
        try:
            self._file.write(len(raw).to_bytes(8, "little"))
            self._file.write(raw)
        except BaseException:
            self.abort()
            raise
        start = 8 + len(raw)
        self._pending = {name: (s, start + off) for name, (s, off) in offsets.items()}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor``'s bytes at ``name``'s offset (each name once)."""
        spec, position = self._pending.pop(name, (None, None))
        if spec is None or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise AssertionError(f"{self.path}: {name} {tuple(tensor.shape)} {tensor.dtype} is not a tensor still "
                                 f"to write here (expected {spec})")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if self._file.tell() != position:
            self._file.seek(position)
        if data.numel():
            self._file.write(data.view(torch.uint8).numpy())  # the buffer itself, no bytes copy

    def close(self) -> None:
        """Finish the file (renamed into place only once every tensor is in, unless ``temp``)."""
        try:
            self._file.close()  # flushes: a full disk may show only now
        except BaseException:
            self.abort()
            raise
        if self._pending:
            os.unlink(self._tmp)
            raise AssertionError(f"{self.path}: {len(self._pending)} tensors were never written: {sorted(self._pending)[:3]}")
        if self._rename:
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # the flush of a file being thrown away (a full disk): nothing to keep
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)


def safetensors_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """``specs`` in the order ``safetensors.torch.save_file`` lays out a file's data."""
    return sorted(specs, key=lambda s: (_SAFETENSORS_RANK[_DTYPES[s.dtype]], s.name))


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Cut ``specs`` (in order) into files of at most ``max_shard_bytes`` (a larger tensor gets a
    file of its own), as ``save_pretrained`` does."""
    files: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if files[-1] and size + s.nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(s)
        size += s.nbytes
    return files


def file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: str, shards: list[list[TensorSpec]], names: list[str], *, into: str | None = None) -> None:
    """``INDEX_NAME`` of ``directory`` for these files (written to ``into`` instead when given)."""
    weight_map = {s.name: file for specs, file in zip(shards, names) for s in specs}
    total = sum(s.nbytes for specs in shards for s in specs)
    with open(into or os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
