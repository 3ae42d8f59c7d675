"""``StreamingWriter`` takes tensors in any order (a stage-3 save writes them as units are gathered)
and, given ``safetensors_order``, writes exactly the bytes ``safetensors.torch.save_file`` writes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_zero.checkpoint.safetensors_stream import StreamingWriter, TensorSpec, safetensors_order

TENSORS = {
    "b.weight": torch.arange(6, dtype=torch.bfloat16).view(2, 3), "a.weight": torch.randn(3, 2),
    "c.mask": torch.tensor([True, False, True]), "d.steps": torch.tensor([7], dtype=torch.int64),
    "e.half": torch.randn(5).half(), "f.empty": torch.zeros(0, 4),
}


def _specs():
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in TENSORS.items()]


def test_any_write_order_gives_save_files_bytes(tmp_path):
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    writer = StreamingWriter(str(ours), safetensors_order(_specs()))
    for name in reversed(list(TENSORS)):  # not the data order
        writer.write(name, TENSORS[name])
    assert not ours.exists()  # only complete files appear under their name
    writer.close()
    save_file(TENSORS, str(theirs), metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes()
    back = load_file(str(ours))
    assert all(torch.equal(back[n], t) for n, t in TENSORS.items())


def test_missing_or_repeated_tensor_is_refused(tmp_path):
    writer = StreamingWriter(str(tmp_path / "x.safetensors"), _specs())
    writer.write("a.weight", TENSORS["a.weight"])
    with pytest.raises(AssertionError, match="not a tensor still to write"):
        writer.write("a.weight", TENSORS["a.weight"])
    with pytest.raises(AssertionError, match="tensors were never written"):
        writer.close()
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.safetensors.tmp").exists()
