"""PEFT LoRA saves under hf_zero are checked tensor by tensor, and the adapter a stage-3 run saves
equals the adapter the same run saves without hf_zero."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from hf_zero.testing.multiprocess import run_on_ranks
from hf_zero.trainer.verify import SaveVerificationError, verify_saved_adapter
from tests.trainer import tiny
from tests.trainer.tiny import with_zero

STEPS = 4


def _lora_model():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny.llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def _train_and_save(rank, world, root):
    out = {}
    for stage in (None, 3):

        def run():
            model = _lora_model()
            path = tiny.out_dir(root, "lora", stage)
            trainer = Trainer(model=model, args=tiny.args(path, max_steps=STEPS), train_dataset=tiny.lm_rows(16))
            trainer.train()
            trainer.save_model(os.path.join(path, "final"))  # checked by hf_zero before it returns
            return os.path.join(path, "final")

        out[stage] = with_zero(stage, run)
    return out


def test_stage3_lora_adapter_equals_the_plain_runs(tmp_path):
    paths = run_on_ranks(_train_and_save, 2, str(tmp_path), timeout=300)[0]
    plain = load_file(os.path.join(paths[None], "adapter_model.safetensors"))
    ours = load_file(os.path.join(paths[3], "adapter_model.safetensors"))
    assert sorted(ours) == sorted(plain) and all("lora_" in n for n in ours)
    for name in plain:
        assert ours[name].dtype == plain[name].dtype and ours[name].shape == plain[name].shape
        torch.testing.assert_close(ours[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(t.abs().max() > 0 for n, t in ours.items() if "lora_B" in n)  # it trained


def test_a_wrong_adapter_file_is_named(tmp_path):
    model = _lora_model()
    model.save_pretrained(str(tmp_path))
    state = model.state_dict()
    assert verify_saved_adapter(str(tmp_path), model, state) == 4 * len(model.base_model.model.model.layers)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    written = load_file(path)
    name = sorted(written)[0]
    written[name] = written[name][:1]  # a cut tensor
    save_file(written, path)
    with pytest.raises(SaveVerificationError, match=rf"tensor '{name}' was written with shape"):
        verify_saved_adapter(str(tmp_path), model, state)
    del written[name]
    save_file(written, path)
    with pytest.raises(SaveVerificationError, match="adapter tensors missing from the file"):
        verify_saved_adapter(str(tmp_path), model, state)
    os.unlink(path)
    with pytest.raises(SaveVerificationError, match="no adapter_model.safetensors was written"):
        verify_saved_adapter(str(tmp_path), model, state)
