"""The dataclasses: defaults, normalisation and validation on construction."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from hf_zero.config import (
    AUTO,
    ConfigError,
    HfZeroConfig,
    OffloadConfig,
    OptimizerSpec,
    PrecisionConfig,
    SchedulerSpec,
    ZeroConfig,
)


def test_defaults_follow_deepspeed():
    zero = ZeroConfig()
    assert zero.stage == 0
    assert zero.reduce_bucket_size == zero.allgather_bucket_size == 500_000_000
    assert zero.prefetch_bucket_size == 50_000_000
    assert zero.param_persistence_threshold == 100_000
    assert zero.max_live_parameters == zero.max_reuse_distance == zero.sub_group_size == 1_000_000_000
    assert zero.contiguous_gradients and zero.reduce_scatter and not zero.round_robin_gradients
    assert zero.offload_optimizer.buffer_count == 4 and zero.offload_param.buffer_count == 5
    precision = PrecisionConfig()
    assert (precision.initial_scale_power, precision.loss_scale_window, precision.hysteresis) == (16, 1000, 2)
    assert precision.min_loss_scale == 1.0 and precision.loss_scale == 0.0
    assert HfZeroConfig().steps_per_print == 10


def test_overlap_comm_default_depends_on_stage():
    assert [ZeroConfig(stage=s).overlap_comm for s in range(4)] == [False, False, False, True]
    assert ZeroConfig(stage=3, overlap_comm=False).overlap_comm is False


def test_every_field_is_documented():
    for cls in (HfZeroConfig, ZeroConfig, OffloadConfig, PrecisionConfig, OptimizerSpec, SchedulerSpec):
        params = dataclasses.fields(cls)
        assert all(len(f.metadata["doc"]) > 20 for f in params), cls


def test_frozen_and_keyword_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ZeroConfig().stage = 2
    with pytest.raises(TypeError):
        ZeroConfig(2)


def test_integral_floats_become_ints():
    zero = ZeroConfig(reduce_bucket_size=5e8, stage=2.0)
    assert zero.reduce_bucket_size == 500_000_000 and type(zero.reduce_bucket_size) is int
    assert type(zero.stage) is int


def test_auto_string_becomes_sentinel():
    zero = ZeroConfig(reduce_bucket_size="auto")
    assert zero.reduce_bucket_size is AUTO
    assert repr(AUTO) == '"auto"'
    assert pickle.loads(pickle.dumps(AUTO)) is AUTO and copy.deepcopy(AUTO) is AUTO


@pytest.mark.parametrize(
    ("kwargs", "key", "value", "allowed"),
    [
        ({"stage": 4}, "ZeroConfig.stage", "4", "an integer >= 0 and <= 3"),
        ({"stage": True}, "ZeroConfig.stage", "true", "an integer"),
        ({"reduce_bucket_size": 1.5}, "ZeroConfig.reduce_bucket_size", "1.5", 'an integer >= 1 or "auto"'),
        ({"reduce_bucket_size": -1}, "ZeroConfig.reduce_bucket_size", "-1", ">= 1"),
        ({"max_live_parameters": "auto"}, "ZeroConfig.max_live_parameters", '"auto"', "an integer >= 0"),
        ({"overlap_comm": 1}, "ZeroConfig.overlap_comm", "1", "true or false"),
    ],
)
def test_zero_value_errors_name_key_value_allowed(kwargs, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        ZeroConfig(**kwargs)
    message = str(err.value)
    assert key in message and f"= {value}" in message and allowed in message


def test_nvme_requires_path():
    with pytest.raises(ConfigError, match=r"OffloadConfig.nvme_path = null: required when device is \"nvme\""):
        OffloadConfig(device="nvme")
    assert OffloadConfig(device="nvme", nvme_path="/nvme").nvme_path == "/nvme"


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.5, float("nan")])
def test_ratio_range(ratio):
    with pytest.raises(ConfigError, match=r"OffloadConfig.ratio .*allowed: a finite number > 0 and <= 1"):
        OffloadConfig(ratio=ratio)


def test_offload_device_choices():
    with pytest.raises(ConfigError, match=r"OffloadConfig.device = \"gpu\".*allowed: one of 'none', 'cpu', 'nvme'$"):
        OffloadConfig(device="gpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stage": 2, "offload_param": OffloadConfig(device="cpu")},
         'offload_param.device = "cpu": parameter offload needs ZeRO stage 3'),
        ({"stage": 0, "offload_optimizer": OffloadConfig(device="cpu")},
         'offload_optimizer.device = "cpu": optimizer offload needs ZeRO stage 1, 2 or 3'),
        ({"stage": 2, "offload_optimizer": OffloadConfig(ratio=0.5)},
         "offload_optimizer.ratio = 0.5: partial offload needs an offload device"),
        ({"stage": 3, "offload_param": OffloadConfig(ratio=0.5)},
         "offload_param.ratio = 0.5: ratio applies to offload_optimizer only"),
    ],
)
def test_offload_needs_the_right_stage(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ZeroConfig(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"dtype": "float16"},
         "PrecisionConfig.dtype = \"float16\": not a valid choice; allowed: one of 'fp32', 'bf16', 'fp16' or \"auto\""),
        ({"loss_scale": -1}, "PrecisionConfig.loss_scale = -1"),
        ({"min_loss_scale": 0}, "allowed: a finite number > 0"),
        ({"hysteresis": 0}, "PrecisionConfig.hysteresis = 0: out of range; allowed: an integer >= 1"),
    ],
)
def test_precision_errors(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        PrecisionConfig(**kwargs)
    assert fragment in str(err.value)


def test_top_level_errors():
    with pytest.raises(ConfigError, match=r"HfZeroConfig.gradient_clipping = true: not a number"):
        HfZeroConfig(gradient_clipping=True)
    with pytest.raises(ConfigError, match=r"HfZeroConfig.train_batch_size = 0: out of range"):
        HfZeroConfig(train_batch_size=0)
    with pytest.raises(ConfigError, match=r"HfZeroConfig.zero = \{\}: not a ZeroConfig"):
        HfZeroConfig(zero={})
    assert HfZeroConfig(gradient_clipping=1).gradient_clipping == 1.0


def test_specs_allow_auto_only_where_it_can_be_filled():
    spec = OptimizerSpec(type="AdamW", params={"lr": "auto", "betas": [0.9, 0.99]})
    assert spec.params == {"lr": AUTO, "betas": [0.9, 0.99]}
    only = r"allowed: \"auto\" only for betas, eps, lr, weight_decay"
    with pytest.raises(ConfigError, match=r"OptimizerSpec.params.momentum = \"auto\": .*" + only):
        OptimizerSpec(type="SGD", params={"momentum": "auto"})
    with pytest.raises(ConfigError, match=r"OptimizerSpec.params.betas\[0\]"):
        OptimizerSpec(type="AdamW", params={"betas": ["auto", 0.99]})
    with pytest.raises(ConfigError, match=r"SchedulerSpec.type = \"\": not a non-empty string"):
        SchedulerSpec(type="")
    assert SchedulerSpec(type="WarmupDecayLR", params={"total_num_steps": "auto"}).params["total_num_steps"] is AUTO


def test_specs_copy_params():
    params = {"lr": 1e-3, "betas": [0.9, 0.99]}
    spec = OptimizerSpec(type="AdamW", params=params)
    params["betas"].append(2)
    assert spec.params["betas"] == [0.9, 0.99]


def test_source_is_not_part_of_equality():
    assert HfZeroConfig(source="a.json") == HfZeroConfig(source="b.json")
