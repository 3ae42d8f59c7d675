"""Bad input stops before any rank starts or any training happens, with a message that names it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import hf_zero.trainer as zt
from hf_zero.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "integration_tests", "scripts", "run_clm_tiny.py")


def _launch(tmp_path, config: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "zero.json"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "hf_zero", "launch", "--nproc_per_node", "2", SCRIPT,
           "--zero_config", str(path), "--output_dir", str(tmp_path / "out"), "--use_cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_typo_fails_before_ranks_start(tmp_path):
    proc = _launch(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_sise": 5}})
    assert proc.returncode == 2
    assert "reduce_bucket_sise" in proc.stderr and "reduce_bucket_size" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_offload_device_fails_before_ranks_start(tmp_path):
    proc = _launch(tmp_path, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                    "offload_param": {"device": "disk"}}})
    assert proc.returncode == 2
    assert "offload_param.device" in proc.stderr and '"disk"' in proc.stderr
    assert "torch.distributed.run" not in proc.stderr  # no rank was started


def _tiny_trainer(tmp_path, **args):
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg)
    targs = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **args)
    ids = torch.randint(0, 64, (8, 8))
    data = [{"input_ids": i, "labels": i} for i in ids]
    return Trainer(model=model, args=targs, train_dataset=data)


@pytest.fixture
def activated():
    yield zt.activate
    zt.deactivate()


def test_conflict_with_training_arguments_names_both_values(tmp_path, activated):
    activated({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4})
    with pytest.raises(ConfigError) as err:
        _tiny_trainer(tmp_path, gradient_accumulation_steps=1)
    msg = str(err.value)
    assert "gradient_accumulation_steps" in msg and "4" in msg and "1" in msg


def test_stage2_in_process_trains_and_reports(tmp_path, activated):
    activated({"zero_optimization": {"stage": 2}})
    trainer = _tiny_trainer(tmp_path, max_steps=3, per_device_train_batch_size=4, logging_steps=1)
    trainer.train()
    assert zt.session_of(trainer).engine is not None
    report = json.loads((tmp_path / "hf_zero_report.json").read_text())
    assert report["stage"] == 2 and report["ranks"][0]["steps"] == 3
    held = report["ranks"][0]["bytes"]
    n = sum(p.numel() for p in trainer.model.parameters())
    assert held["optimizer_state"] == 8 * n  # AdamW, one rank: exp_avg + exp_avg_sq in fp32


def test_deactivate_restores_plain_trainer(tmp_path):
    zt.activate({"zero_optimization": {"stage": 1}})
    zt.deactivate()
    trainer = _tiny_trainer(tmp_path, max_steps=1)
    assert zt.session_of(trainer) is None
    assert Trainer.create_optimizer.__module__ == "transformers.trainer"
