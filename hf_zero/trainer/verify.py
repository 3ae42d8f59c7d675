"""Saves that cannot be silently wrong: check the weight files a save wrote against the model.

After ``save_model`` under hf_zero, rank 0 reads the safetensors headers it just wrote (no tensor
data is loaded), checks each file's length against its header, and every written tensor's shape,
dtype and byte count against the state dict that was saved. A mismatch (an empty shard written
as a weight, a wrong dtype, a truncated tensor) raises ``SaveVerificationError`` naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
import struct

import torch

# safetensors dtype names -> torch dtypes (the ones a model save can produce)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SaveVerificationError(RuntimeError):
    """A weight file does not hold what the model has."""


def _header(path: str) -> dict:
    """The file's tensor entries; a file shorter or longer than its header says is an error (a
    streamed write cut short would otherwise pass every per-tensor check)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    data = max((info["data_offsets"][1] for info in header.values()), default=0)
    if os.path.getsize(path) != 8 + length + data:
        raise SaveVerificationError(f"{path}: {os.path.getsize(path)} bytes, its header describes {8 + length + data}")
    return header


def weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(directory, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(directory, "model.safetensors")
    return [single] if os.path.isfile(single) else []


def _check(path: str, name: str, info: dict, expected: torch.Tensor) -> None:
    shape, dtype = list(info["shape"]), _DTYPES.get(info["dtype"])
    start, end = info["data_offsets"]
    problems = []
    if shape != list(expected.shape):
        problems.append(f"shape {shape}, the model has {list(expected.shape)}")
    if dtype is not expected.dtype:
        problems.append(f"dtype {info['dtype']}, the model has {expected.dtype}")
    if end - start != expected.numel() * expected.element_size():
        problems.append(f"{end - start} bytes, the model's tensor has {expected.numel() * expected.element_size()}")
    if problems:
        raise SaveVerificationError(f"{path}: tensor {name!r} was written with " + "; ".join(problems))


def verify_saved_weights(directory: str, state_dict: dict[str, torch.Tensor]) -> int:
    """Check every tensor written in ``directory`` against ``state_dict``; return how many were checked."""
    files = weight_files(directory)
    if not files:
        raise SaveVerificationError(f"{directory}: no model.safetensors (or index) was written")
    checked = 0
    for path in files:
        for name, info in _header(path).items():
            expected = state_dict.get(name)
            if expected is None:
                continue  # a name the model's save format converts; nothing to compare it with
            _check(path, name, info, expected)
            checked += 1
    if checked == 0:
        raise SaveVerificationError(f"{directory}: none of the written tensors is a tensor of the model")
    return checked


ADAPTER_NAME = "adapter_model.safetensors"


def verify_saved_adapter(directory: str, model, state_dict: dict[str, torch.Tensor]) -> int:
    """A PEFT model's save: every adapter tensor PEFT selects from ``state_dict`` (under the names
    it writes) is in ``adapter_model.safetensors`` with its shape, dtype and bytes, and nothing
    else is; returns how many were checked."""
    from peft import get_peft_model_state_dict

    path = os.path.join(directory, ADAPTER_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            return 0  # save_safetensors=False: a pickle, whose contents this check does not read
        raise SaveVerificationError(f"{directory}: no {ADAPTER_NAME} was written")
    expected = get_peft_model_state_dict(model, state_dict=state_dict)
    header = _header(path)
    missing = sorted(set(expected) - set(header))
    if missing:
        raise SaveVerificationError(f"{path}: adapter tensors missing from the file: {missing[:3]}"
                                    + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    extra = sorted(set(header) - set(expected))
    if extra:
        raise SaveVerificationError(f"{path}: tensors that are not adapter weights were written: {extra[:3]}")
    for name, info in header.items():
        _check(path, name, info, expected[name])
    return len(header)
