"""The optimizer and scheduler blocks are checked when the file is read: an unknown type, or a param its
type does not take, stops ``check-config`` / ``hf_zero.trainer.check`` (what the
launcher and every rank run first) with the key, the value and what is allowed. A type DeepSpeed builds and
hf_zero cannot is refused by the table of what this version cannot run (config/unsupported.py), from
the same places."""

from __future__ import annotations

import inspect

import pytest
import torch

from hf_zero.cli import main as cli
from hf_zero.config import ConfigError
from hf_zero.config.optimizer_block import TORCH_TYPES, allowed_types, torch_class
from hf_zero.config.unsupported import UnsupportedConfig, refusals, refuse
from hf_zero.trainer import check

from .helpers import load_quiet

ALLOWED = "allowed: Adam, AdamW, SGD, Adagrad, Adamax, NAdam, RAdam, Adadelta, RMSprop, Rprop, ASGD"


def _refusal(block: dict, tmp_path) -> str:
    with pytest.raises(ConfigError) as err:
        load_quiet({"zero_optimization": {"stage": 2}, **block}, source="z.json")
    return str(err.value)


@pytest.mark.parametrize("written, why", [
    ("OneBitLamb", "1-bit LAMB"),
    ("OneBitAdam", '"AdamW" is the same update without it'),
    ("ZeroOneAdam", "0/1 Adam"),
    ("Lamb", "torch has no LAMB"),
    ("LAMB", "torch has no LAMB"),
    ("Lion", "torch has no Lion"),
    ("MuAdamW", "mup's MuAdamW"),
    ("Muon", "flat shards"),
    ("LBFGS", "closure"),
])
def test_types_without_a_torch_equivalent_are_refused_with_the_alternatives(written, why):
    """A type DeepSpeed builds loads (its params are DeepSpeed's, e.g. 1-bit Adam's freeze_step), and the one
    table of what this version cannot run refuses it (config/unsupported.py, row optimizer-type)."""
    config = load_quiet({"zero_optimization": {"stage": 2},
                         "optimizer": {"type": written, "params": {"lr": "auto", "freeze_step": 400}}},
                        source="z.json")
    [message] = refusals(config)
    assert message.startswith(f'optimizer.type = "{written}" in z.json: ')
    assert why in message and " is not implemented in hf_zero; " in message
    assert 'use "AdamW"' in message and f"({ALLOWED.removeprefix('allowed: ')})" in message
    with pytest.raises(UnsupportedConfig) as caught:
        refuse(config)
    assert str(caught.value) == message


@pytest.mark.parametrize("written, hint", [("sgd", "did you mean 'SGD'?"), ("RMSProp", "did you mean 'RMSprop'?"),
                                           ("FusedAdam", "")])
def test_unknown_type_names_the_closest(written, hint, tmp_path):
    message = _refusal({"optimizer": {"type": written}}, tmp_path)
    assert message.startswith(f'optimizer.type = "{written}" in z.json: not an optimizer hf_zero builds')
    assert hint in message and ALLOWED in message


@pytest.mark.parametrize("params, key, text", [
    ({"momentum": 0.9}, "optimizer.params.momentum", "not a parameter of AdamW"),
    ({"weight_decy": 0.1}, "optimizer.params.weight_decy", "did you mean 'weight_decay'?"),
    ({"max_grad_norm": 1.0}, "optimizer.params.max_grad_norm", '"gradient_clipping" key instead'),
    ({"bias_correction": False}, "optimizer.params.bias_correction", "no torch equivalent"),
    ({"betas": [0.9]}, "optimizer.params.betas", "not two numbers in [0, 1)"),
    ({"lr": -1}, "optimizer.params.lr", "not a number >= 0"),
    ({"adam_w_mode": 1}, "optimizer.params.adam_w_mode", "not a boolean"),
])
def test_bad_adam_params_name_the_key(params, key, text, tmp_path):
    message = _refusal({"optimizer": {"type": "AdamW", "params": params}}, tmp_path)
    assert message.startswith(f"{key} = ") and text in message


def test_torch_type_params_are_that_class_s():
    message = str(pytest.raises(ConfigError, load_quiet,
                                {"optimizer": {"type": "SGD", "params": {"betas": [0.9, 0.99]}}}).value)
    assert "optimizer.params.betas" in message and "not a parameter of SGD" in message
    assert load_quiet({"optimizer": {"type": "SGD", "params": {"momentum": 0.9, "nesterov": True}}})


@pytest.mark.parametrize("name", sorted(TORCH_TYPES))
def test_torch_types_exist_and_take_the_listed_params(name):
    """The table is torch-free; hold it against the installed torch."""
    accepted = set(inspect.signature(getattr(torch.optim, name)).parameters)
    assert set(TORCH_TYPES[name]) <= accepted


@pytest.mark.parametrize("written, params, cls", [
    ("AdamW", {}, "AdamW"), ("adamw", {}, "AdamW"), ("Adam", {}, "AdamW"),
    ("Adam", {"adam_w_mode": True}, "AdamW"), ("Adam", {"adam_w_mode": False}, "Adam"),
    ("AdamW", {"adam_w_mode": False}, "AdamW"),  # DeepSpeed: type AdamW forces AdamW
    ("adagrad", {}, "Adagrad"), ("SGD", {}, "SGD"), ("RMSprop", {}, "RMSprop"),
])
def test_the_torch_class_deepspeed_would_run(written, params, cls):
    assert torch_class(written, params) == cls
    assert load_quiet({"optimizer": {"type": written, "params": params}}).optimizer.type == written


@pytest.mark.parametrize("block, key, text", [
    ({"type": "WarmupLr"}, "scheduler.type", "did you mean 'WarmupLR'?"),
    ({"type": "cosine"}, "scheduler.type", "allowed: WarmupLR, WarmupDecayLR, WarmupCosineLR"),
    ({"type": "ReduceLROnPlateau"}, "scheduler.type", "steps on a metric"),
    ({"type": "CosineAnnealingLR"}, "scheduler.params.T_max", "torch's CosineAnnealingLR needs it"),
    ({"type": "WarmupLR", "params": {"total_num_steps": 10}}, "scheduler.params.total_num_steps",
     "not a parameter of WarmupLR"),
    ({"type": "WarmupDecayLR", "params": {"warmup_num_steps": 5}}, "scheduler.params.total_num_steps",
     "WarmupDecayLR needs it"),
    ({"type": "WarmupLR", "params": {"warmup_type": "cosine"}}, "scheduler.params.warmup_type",
     'allowed: "log", "linear"'),
    ({"type": "WarmupLR", "params": {"warmup_num_steps": 0}}, "scheduler.params.warmup_num_steps",
     "not an integer >= 1"),
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_max_lr": "auto"}},
     "scheduler.params.warmup_max_lr", "not a parameter of WarmupCosineLR"),
    ({"type": "OneCycle", "params": {"cycle_min_lr": 0.1}}, "scheduler.params.cycle_max_lr", "OneCycle needs it"),
    ({"type": "OneCycle", "params": {"cycle_min_lr": 0.1, "cycle_max_lr": 1, "cycle_first_step_size": 0}},
     "scheduler.params.cycle_first_step_size", "not > 0"),
])
def test_bad_scheduler_blocks_name_the_key(block, key, text, tmp_path):
    message = _refusal({"scheduler": block}, tmp_path)
    assert message.startswith(f"{key} = ") and text in message


def test_check_config_and_trainer_check_refuse_before_anything_runs(tmp_path, capsys):
    """What `hf-zero check-config`, `hf-zero launch` and every rank run first refuses the type."""
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "OneBitLamb", "params": {}}}')
    with pytest.raises(UnsupportedConfig, match=r'optimizer.type = "OneBitLamb"'):
        check(str(path))
    assert cli(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert 'optimizer.type = "OneBitLamb"' in err and ALLOWED.removeprefix("allowed: ") in err


def test_allowed_types_are_what_the_message_lists():
    assert ", ".join(allowed_types()) == ALLOWED.removeprefix("allowed: ")
