"""fp16 with stage 2 through the Trainer on a GPU: torch's ShardedGradScaler replaces accelerate's
scaler, gradients are unscaled before clipping, and losses follow the plain fp16 Trainer's."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import hf_zero.trainer as zt


def _train(tmp_path, zero: bool):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 128, (64, 1), generator=g)
    ids = (starts + torch.arange(32)) % 128
    data = [{"input_ids": i, "labels": i} for i in ids]
    args = TrainingArguments(output_dir=str(tmp_path), fp16=True, max_steps=12, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                             max_grad_norm=1.0, disable_tqdm=True)
    if zero:
        zt.activate({"zero_optimization": {"stage": 2}, "fp16": {"enabled": "auto", "hysteresis": 1}})
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    finally:
        zt.deactivate()
    hist = trainer.state.log_history
    return trainer, [h["loss"] for h in hist if "loss" in h], [h["grad_norm"] for h in hist if "grad_norm" in h]


@pytest.mark.gpu
def test_fp16_stage2_follows_plain_fp16(tmp_path):
    _, plain_loss, plain_norm = _train(tmp_path / "plain", zero=False)
    trainer, loss, norm = _train(tmp_path / "zero", zero=True)
    scaler = trainer.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and not isinstance(scaler, ShardedGradScaler)  # one rank
    assert scaler.get_scale() <= 2.0**16  # the config's initial_scale_power (default 16), never grown
    # fp16 params (hf_zero, like DeepSpeed) vs fp32 params under autocast (plain): fp16 rounding apart
    for a, b in zip(loss, plain_loss):
        assert abs(a - b) <= 2e-2 * abs(b), (loss, plain_loss)
    finite = [(a, b) for a, b in zip(norm, plain_norm) if b == b and b != float("inf")]
    assert finite and all(abs(a - b) <= 0.1 * b for a, b in finite), (norm, plain_norm)  # unscaled norms
    assert loss[-1] < loss[0]

