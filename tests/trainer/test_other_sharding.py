"""A Trainer set up for DeepSpeed or FSDP while hf_zero is active is refused with the fix
(hf_zero/trainer/other_sharding.py), before transformers sets either up."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import hf_zero.trainer as zt
from hf_zero.config.errors import ArgumentsMismatch
from hf_zero.trainer.other_sharding import refuse

from .tiny import llama

ZERO = {"zero_optimization": {"stage": 2}}


@pytest.fixture
def activated():
    zt.activate(ZERO)
    yield
    zt.deactivate()


def _trainer(args):
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (4, 8))]
    return Trainer(model=llama(), args=args, train_dataset=data)


def _args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)


def test_deepspeed_in_training_arguments(tmp_path, activated):
    args = _args(tmp_path)
    args.deepspeed = "ds_config.json"  # as TrainingArguments(deepspeed=...) would with DeepSpeed installed
    with pytest.raises(ArgumentsMismatch) as caught:
        _trainer(args)
    message = str(caught.value)
    assert message.startswith("TrainingArguments.deepspeed = 'ds_config.json' while hf_zero runs ZeRO from ")
    assert "take --deepspeed FILE as the zero config" in message and "hf_zero.trainer.activate(FILE)" in message


def test_fsdp_in_training_arguments(tmp_path, activated):
    with pytest.raises(ArgumentsMismatch, match=r"^TrainingArguments.fsdp = True while hf_zero runs ZeRO .*"
                                                r"drop fsdp / fsdp_config"):
        _trainer(_args(tmp_path, fsdp=True))


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_accelerate_set_up_for_another_sharding(tmp_path, activated, monkeypatch, variable, name):
    args = _args(tmp_path)  # before the variable: TrainingArguments would build the plugin itself
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ArgumentsMismatch) as caught:
        _trainer(args)
    assert str(caught.value).startswith(f"accelerate is set up for {name} (its {name.lower()} plugin")
    assert "`hf-zero launch`" in str(caught.value)


def test_a_plugin_accelerate_built_is_refused():
    """After transformers' __init__ the seam passes what accelerate set up (Trainer.is_*_enabled)."""
    with pytest.raises(ArgumentsMismatch, match="accelerate is set up for DeepSpeed"):
        refuse(None, {}, "z.json", deepspeed_plugin=True)
    refuse(None, {"ACCELERATE_USE_FSDP": "false"}, "z.json")  # nothing asked for

