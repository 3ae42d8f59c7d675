"""[Note: out-of-memory hint] on a GPU: a real allocator out-of-memory error in train() (a forward
hook asks for more than the device has) goes on unchanged, and the hint's first line gives the
device's memory from torch.cuda (the CPU tests in tests/trainer/test_oom_hint.py cannot reach that line)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from hf_zero.byte_units import fmt_bytes
from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer.test_oom_hint import hint_messages

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _oom_run(rank, world, root):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (8, 12))]
    args = TrainingArguments(output_dir=str(root), report_to="none", max_steps=2, per_device_train_batch_size=2,
                             save_strategy="no", disable_tqdm=True, bf16=True)
    too_much = 2 * torch.cuda.get_device_properties(0).total_memory

    def out_of_memory(module, inputs, output):
        torch.empty(too_much, dtype=torch.uint8, device=output.device)

    model.lm_head.register_forward_hook(out_of_memory)
    with hint_messages({"zero_optimization": {"stage": 2}}) as messages:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        with pytest.raises(torch.OutOfMemoryError):
            trainer.train()
    return messages


def test_a_real_out_of_memory_error_gets_the_device_memory_line(tmp_path):
    (messages,) = run_on_ranks(_oom_run, 1, tmp_path, timeout=240, backend="nccl")
    (text,) = messages
    total = torch.cuda.get_device_properties(0).total_memory
    assert f"reserved by torch, of {fmt_bytes(total)}" in text
    assert "zero_optimization.stage = 2" in text
