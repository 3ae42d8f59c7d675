"""An out-of-memory error in train() is told with the settings that hold what on the device
([Note: out-of-memory hint] in hf_zero/trainer/oom_hint.py): the same exception goes on, and the
rank logs one block naming only the settings of this run that would move something, with their
values (a stage-3 run is not told to use stage 3; device_checkpoints with how many were held)."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import hf_zero.trainer as zt
from hf_zero.testing.multiprocess import run_on_ranks

LAYERS = 3


@contextmanager
def hint_messages(config: dict):
    """hf_zero activated with ``config`` inside; yields the list the hint's log lines land in."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("hf_zero.trainer.oom_hint")
    logger.addHandler(handler)
    zt.activate(config)
    try:
        yield messages
    finally:
        zt.deactivate()
        logger.removeHandler(handler)


def _oom_run(rank, world, root, config, checkpointing):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (8, 12))]
    args = TrainingArguments(output_dir=str(root), use_cpu=True, report_to="none", max_steps=2,
                             per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True,
                             gradient_checkpointing=checkpointing,
                             gradient_checkpointing_kwargs={"use_reentrant": False})

    def out_of_memory(module, inputs, output):  # after every decoder layer's forward: checkpoints packed
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (a test)")

    model.lm_head.register_forward_hook(out_of_memory)
    with hint_messages(config) as messages:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        try:
            trainer.train()
            raised = None
        except torch.OutOfMemoryError as error:
            raised = str(error)
    return raised, messages


def _hint(tmp_path, config, checkpointing):
    ((raised, messages),) = run_on_ranks(_oom_run, 1, tmp_path, config, checkpointing, timeout=240)
    assert raised == "CUDA out of memory. Tried to allocate 4.00 GiB (a test)"  # the same error, unchanged
    assert len(messages) == 1, messages
    return messages[0]


def test_stage2_without_offload_or_checkpointing(tmp_path):
    text = _hint(tmp_path, {"zero_optimization": {"stage": 2}}, checkpointing=False)
    assert "out-of-memory hint" in text
    assert "hf_zero holds on the device: params" in text and "optimizer state and fp32 masters" in text
    assert "zero_optimization.stage = 2: stage 3 also shards the parameters" in text
    assert 'offload_optimizer.device = "none": "cpu" moves' in text
    assert "--gradient_checkpointing (off)" in text
    assert "tiled_mlp (not set)" in text and "tiled_loss (not set)" in text
    assert "--per_device_train_batch_size = 2" in text
    assert "offload_param" not in text and "device_checkpoints" not in text  # not a stage-3 run, no checkpointing


def test_stage3_offloaded_with_device_checkpoints(tmp_path):
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "offload_optimizer": {"device": "cpu", "ratio": 0.5}},
              "activation_checkpointing": {"cpu_checkpointing": True, "device_checkpoints": 2},
              "tiled_mlp": {"shards": 2}, "tiled_loss": {"shards": 2}}
    text = _hint(tmp_path, config, checkpointing=True)
    assert "zero_optimization.stage" not in text and 'offload_optimizer.device = "none"' not in text
    assert "offload_optimizer.ratio = 0.5: 50% of the optimizer state stays on the device" in text
    assert 'offload_param.device = "none": "cpu" keeps the parameter shards in host memory' in text
    # the lm_head runs after all 3 layers packed their inputs: the first 2 held on the device
    assert "activation_checkpointing.device_checkpoints = 2 (2 held when it ran out)" in text
    assert "tiled_mlp" not in text and "tiled_loss" not in text and "--gradient_checkpointing" not in text
