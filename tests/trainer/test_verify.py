"""Save verification: every written tensor is checked against the model's state dict."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hf_zero.trainer.verify import SaveVerificationError, verify_saved_weights

MODEL = {"a.weight": torch.ones(4, 3), "b.bias": torch.zeros(5, dtype=torch.bfloat16)}


def test_good_save_passes(tmp_path):
    save_file(MODEL, str(tmp_path / "model.safetensors"))
    assert verify_saved_weights(str(tmp_path), MODEL) == 2


@pytest.mark.parametrize(
    "written, message",
    [
        ({"a.weight": torch.ones(0), "b.bias": MODEL["b.bias"]}, "tensor 'a.weight' was written with shape [0]"),
        ({"a.weight": MODEL["a.weight"], "b.bias": torch.zeros(5)}, "'b.bias' was written with dtype F32"),
        ({"a.weight": torch.ones(3, 4), "b.bias": MODEL["b.bias"]}, "shape [3, 4], the model has [4, 3]"),
    ],
)
def test_wrong_tensor_is_named(tmp_path, written, message):
    save_file(written, str(tmp_path / "model.safetensors"))
    with pytest.raises(SaveVerificationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        verify_saved_weights(str(tmp_path), MODEL)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(SaveVerificationError, match="no model.safetensors"):
        verify_saved_weights(str(tmp_path), MODEL)


def test_cut_short_file_is_an_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(MODEL, str(path))
    path.write_bytes(path.read_bytes()[:-4])  # a streamed write that stopped early
    with pytest.raises(SaveVerificationError, match="its header describes"):
        verify_saved_weights(str(tmp_path), MODEL)
