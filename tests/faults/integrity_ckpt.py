"""A tiny hf_zero sharded checkpoint for the fault tests: one stage-2 engine on one rank
(no process group), saved once through ``sharded.save`` beside a Trainer-like folder."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def make_checkpoint(folder, *, step: int = 4, run_id: str = "run-a", seed: int = 0):
    from hf_zero.checkpoint import sharded
    from hf_zero.engine import ZeroEngine

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = ZeroEngine(model, optimizer, stage=2, bucket_numel=1 << 20)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    engine.finish_grad_sync() if hasattr(engine, "finish_grad_sync") else None
    optimizer.step()
    sharded.save(engine, str(folder), run_id=run_id, step=step)
    config.save_pretrained(str(folder))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder
