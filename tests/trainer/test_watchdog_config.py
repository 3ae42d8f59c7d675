"""`comm_timeout_s` reaches the hang watchdog, and `checkpoint_digest` the checkpoint digests, when
hf_zero attaches to a Trainer (the __init__ seam)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import hf_zero.trainer as zt
from hf_zero.checkpoint import digests
from hf_zero.engine.diagnostics import watchdog


def test_trainer_applies_comm_timeout_s_and_checkpoint_digest(tmp_path, monkeypatch):
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (4, 8))]
    monkeypatch.delenv(digests.MODE_ENV, raising=False)
    zt.activate({"zero_optimization": {"stage": 2}, "comm_timeout_s": 42, "checkpoint_digest": "fast"})
    try:
        Trainer(model=model, args=args, train_dataset=data)
        assert watchdog.timeout_s() == 42.0
        assert watchdog.running() is None  # one rank: nothing to watch
        assert digests.mode() == "fast"
    finally:
        zt.deactivate()
        watchdog.configure(None)
        digests.configure(digests.DEFAULT_MODE)
