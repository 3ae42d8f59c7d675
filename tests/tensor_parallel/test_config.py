"""tensor_parallel.autotp_size in the config: read from DeepSpeed's block, and the batch-size product counts
world_size / autotp_size ranks (each tp group trains on one batch), as DeepSpeed AutoTP training does."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments

from hf_zero.config import ConfigError, load_config, resolve_config


def _resolve(tmp_path, block: dict, world: int, **args):
    config = load_config({"zero_optimization": {"stage": 2}, **block})
    return resolve_config(config, TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **args), world_size=world)


def test_train_batch_size_counts_data_parallel_ranks(tmp_path):
    tp = {"tensor_parallel": {"autotp_size": 2}}
    assert _resolve(tmp_path, tp, 4, per_device_train_batch_size=2).train_batch_size == 4  # 2 x 1 x 4 / 2
    assert _resolve(tmp_path, {**tp, "train_batch_size": 8}, 4, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2).train_batch_size == 8
    with pytest.raises(ConfigError, match=r"world_size / tensor_parallel.autotp_size \(2\) = 4"):
        _resolve(tmp_path, {**tp, "train_batch_size": 8}, 4, per_device_train_batch_size=2)


def test_autotp_size_must_divide_the_world(tmp_path):
    with pytest.raises(ConfigError, match=r"autotp_size = 3 does not divide world_size = 4.*allowed: \[1, 2, 4\]"):
        _resolve(tmp_path, {"tensor_parallel": {"autotp_size": 3}}, 4)


def test_preflight_counts_data_parallel_ranks():
    """The check hf-zero check-config --world_size, doctor and the launch preflight run before any rank starts."""
    from hf_zero.doctor.config_checks import check_train_batch_size

    config = load_config({"tensor_parallel": {"autotp_size": 2}, "train_batch_size": 4,
                          "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1})
    check_train_batch_size(config, 4)
    with pytest.raises(ValueError, match=r"world_size / tensor_parallel.autotp_size \(4\) = 8"):
        check_train_batch_size(config, 8)
    with pytest.raises(ValueError, match=r"autotp_size = 2 .* does not divide world_size 3"):
        check_train_batch_size(config, 3)
