"""Write safetensors files one tensor at a time, and cut a model into HF's numbered shards.

``safetensors.torch.save_file`` takes every tensor of a file at once; a consolidated checkpoint
of a model larger than host memory cannot be built that way. The format is simple (an 8-byte
little-endian header length, a JSON header with each tensor's dtype, shape and byte range, then
the raw bytes in order), and every tensor's dtype and shape are known before any is read, so
the header is written first and each tensor's bytes are appended as it arrives. Files written
here are read back with ``safetensors`` itself in the tests.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
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


class StreamingWriter:
    """One safetensors file whose tensors (``specs``, in order) are written one by one."""

    def __init__(self, path: str, specs: list[TensorSpec]) -> None:
        for s in specs:
            if s.dtype not in _DTYPES:
                raise ValueError(f"{s.name}: dtype {s.dtype} cannot be written to safetensors here")
        self.path, self.specs, self._next = path, specs, 0
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in specs:
            header[s.name] = {"dtype": _DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._tmp = path + ".tmp"
        self._file = open(self._tmp, "wb")
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise AssertionError(f"expected {spec}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._file.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self._next += 1

    def close(self) -> None:
        """Finish the file (renamed into place only once every tensor is in)."""
        self._file.close()
        if self._next != len(self.specs):
            os.unlink(self._tmp)
            raise AssertionError(f"{self.path}: {len(self.specs) - self._next} tensors were never written")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)


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


def write_index(directory: str, shards: list[list[TensorSpec]], names: list[str]) -> None:
    weight_map = {s.name: file for specs, file in zip(shards, names) for s in specs}
    total = sum(s.nbytes for specs in shards for s in specs)
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
