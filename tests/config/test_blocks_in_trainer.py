"""The optimizer and scheduler blocks run in the Trainer (stage 2, one CPU process, a tiny Llama).

transformers' own ds_config_zero2.json shape (data/zero2.json: AdamW and WarmupLR, every value
"auto") must train with DeepSpeed's WarmupLR, not the Trainer's linear decay: the lr logged at
each step is DeepSpeed's, taken from the curve its own code produced (data/ds_lr_curves/).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import hf_zero.trainer as zt
from hf_zero.config import ConfigError

from .helpers import sample

CURVES = json.loads((Path(__file__).parent / "data" / "ds_lr_curves" / "ds_lr_curves.json").read_text())["cases"]


def _trainer(tmp_path, **args) -> Trainer:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg)
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                logging_steps=1, per_device_train_batch_size=2, seed=0, dataloader_num_workers=0)
    base.update(args)
    ids = torch.randint(0, 64, (64, 8), generator=torch.Generator().manual_seed(1))
    return Trainer(model=model, args=TrainingArguments(**base), train_dataset=[{"input_ids": i, "labels": i} for i in ids])


@pytest.fixture
def zero2():
    """transformers' ds_config_zero2.json, CPU optimizer offload and all."""
    zt.activate(sample("zero2.json"))
    yield
    zt.deactivate()


def test_zero2_example_runs_deepspeeds_warmup_and_adamw(tmp_path, zero2, capsys):
    # "auto" fills warmup_min_lr 0, warmup_max_lr 1e-2 and warmup_num_steps 7: this curve's params.
    want = next(c for c in CURVES if c["type"] == "WarmupLR" and c["params"] == {
        "warmup_min_lr": 0, "warmup_max_lr": 1e-2, "warmup_num_steps": 7})
    trainer = _trainer(tmp_path, learning_rate=1e-2, warmup_steps=7, max_steps=10, weight_decay=0.05,
                       adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, lr_scheduler_type="linear")
    trainer.train()
    assert zt.session_of(trainer).engine is not None  # stage 2 ran

    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(logged) == 10
    for step, lr in enumerate(logged):  # the Trainer logs the lr each step ran with
        assert math.isclose(lr, want["lr"][step][0], rel_tol=1e-6, abs_tol=0.0), (step, lr, want["lr"][step])
    assert logged[:3] == [0.0, 0.0, pytest.approx(1e-2 * math.log(2) / math.log(7))]  # not linear decay

    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around the torch optimizer
    assert type(optimizer) is torch.optim.AdamW
    assert len(optimizer.param_groups) == 1  # as DeepSpeed: weight decay on every trainable param
    group = optimizer.param_groups[0]
    assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.05, (0.8, 0.95), 1e-7)

    err = capsys.readouterr().err
    assert ('hf_zero: optimizer torch.optim.AdamW from optimizer.type "AdamW" in <dict>: '
            'lr=0.01 ("auto": TrainingArguments.learning_rate), betas=[0.8, 0.95] ("auto": '
            '[TrainingArguments.adam_beta1, TrainingArguments.adam_beta2])') in err
    assert ('hf_zero: scheduler WarmupLR (DeepSpeed\'s formula) from scheduler.type "WarmupLR" in <dict>: '
            'warmup_min_lr=0 ("auto": 0') in err
    assert 'warmup_num_steps=7 ("auto": max(1, TrainingArguments.get_warmup_steps' in err
    assert "warmup_type=\"log\" (DeepSpeed's default)" in err
    assert "replaces the Trainer's --lr_scheduler_type linear" in err


@pytest.mark.parametrize("block, want_cls, want", [
    ({"type": "Adam", "params": {"lr": 2e-3, "adam_w_mode": False}}, torch.optim.Adam,
     {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}),
    ({"type": "AdamW", "params": {"lr": "auto"}}, torch.optim.AdamW,
     {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}),  # FusedAdam's, not torch's 0.01
    ({"type": "SGD", "params": {"lr": "auto", "momentum": 0.9, "weight_decay": "auto"}}, torch.optim.SGD,
     {"lr": 2e-3, "momentum": 0.9, "weight_decay": 0.1, "nesterov": False}),
    ({"type": "adagrad", "params": {"lr_decay": 0.01}}, torch.optim.Adagrad, {"lr": 0.01, "lr_decay": 0.01}),
])
def test_optimizer_class_and_hyperparameters(tmp_path, block, want_cls, want):
    """Stage 0 and 2 alike build the block's optimizer; "auto" takes TrainingArguments, the rest DeepSpeed's."""
    for stage in (0, 2):
        zt.activate({"zero_optimization": {"stage": stage}, "optimizer": block})
        try:
            trainer = _trainer(tmp_path / str(stage), learning_rate=2e-3, weight_decay=0.1, max_steps=1)
            trainer.create_optimizer()
            optimizer = trainer.optimizer
            assert type(optimizer) is want_cls
            assert len(optimizer.param_groups) == 1
            group = optimizer.param_groups[0]
            assert {k: (tuple(group[k]) if k == "betas" else group[k]) for k in want} == want
        finally:
            zt.deactivate()


def test_deepspeed_schedule_on_the_trainers_optimizer(tmp_path):
    """A scheduler block without an optimizer block: DeepSpeed's schedule on the Trainer's AdamW
    (two groups, its weight-decay split), as transformers' DeepSpeed integration allows."""
    want = next(c for c in CURVES if c["type"] == "WarmupCosineLR" and c["params"].get("warmup_min_ratio") is None
                and c["params"]["total_num_steps"] == 30)
    zt.activate({"zero_optimization": {"stage": 2},
                 "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto",
                                                                    "warmup_num_steps": 5}}})
    try:
        trainer = _trainer(tmp_path, learning_rate=2e-3, max_steps=30, warmup_steps=5)
        trainer.train()
    finally:
        zt.deactivate()
    assert len(trainer.optimizer.optimizer.param_groups) == 2  # the Trainer's own optimizer
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert [round(x, 15) for x in logged] == [round(lr[0], 15) for lr in want["lr"][:30]]


def test_block_and_trainer_argument_for_the_same_thing_are_refused(tmp_path):
    zt.activate({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}})
    try:
        model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                             num_hidden_layers=1, num_attention_heads=2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ConfigError, match=r"the optimizer block in <dict> and Trainer\(optimizers="):
            Trainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
                    optimizers=(opt, None))
    finally:
        zt.deactivate()


def test_a_torch_scheduler_block_runs_in_the_trainer(tmp_path, capsys):
    """{"type": "StepLR"}: DeepSpeed builds torch's StepLR and steps it once per optimizer step; so does hf_zero."""
    zt.activate({"zero_optimization": {"stage": 2},
                 "scheduler": {"type": "StepLR", "params": {"step_size": 3, "gamma": 0.5}}})
    try:
        trainer = _trainer(tmp_path, learning_rate=1e-2, max_steps=7, lr_scheduler_type="linear")
        trainer.train()
    finally:
        zt.deactivate()
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged == pytest.approx([1e-2 * 0.5 ** (step // 3) for step in range(7)], rel=1e-9)
    assert "scheduler torch.optim.lr_scheduler.StepLR from scheduler.type \"StepLR\"" in capsys.readouterr().err
