"""DeepSpeed JSON files: realistic samples load, keys map, errors name the DeepSpeed key path."""

from __future__ import annotations

import warnings

import pytest

from hf_zero.config import AUTO, NOT_APPLIED, ConfigError, load_config
from hf_zero.config.deepspeed import key_mapping
from tests.config.helpers import DATA, SAMPLES, load_quiet, sample


@pytest.mark.parametrize("name", SAMPLES)
def test_samples_load(name):
    config = load_quiet(DATA / name)
    assert config.source.endswith(name)
    assert config.zero.stage == int(name[4])


def test_zero2_with_auto_everywhere():
    config = load_quiet(DATA / "zero2.json")
    zero = config.zero
    assert (zero.stage, zero.allgather_bucket_size, zero.reduce_bucket_size) == (2, 200_000_000, 200_000_000)
    assert zero.overlap_comm is True and zero.reduce_scatter is True
    assert (zero.offload_optimizer.device, zero.offload_optimizer.pin_memory) == ("cpu", True)
    assert zero.offload_param.device == "none"
    assert config.precision.dtype is AUTO
    assert config.gradient_clipping is AUTO and config.train_batch_size is AUTO
    assert config.optimizer.type == "AdamW" and set(config.optimizer.params.values()) == {AUTO}
    assert config.scheduler.params == {"warmup_min_lr": AUTO, "warmup_max_lr": AUTO, "warmup_num_steps": AUTO}


def test_zero3_cpu_offload_and_hidden_size_autos():
    config = load_quiet(DATA / "zero3.json")
    zero = config.zero
    assert zero.offload_param.device == zero.offload_optimizer.device == "cpu"
    assert zero.prefetch_bucket_size is AUTO and zero.param_persistence_threshold is AUTO
    assert zero.max_live_parameters == 1_000_000_000 and zero.gather_16bit_weights_on_model_save is True


def test_zero3_nvme():
    zero = load_quiet(DATA / "zero3_nvme.json").zero
    assert zero.offload_param.nvme_path == zero.offload_optimizer.nvme_path == "/local_nvme"
    assert (zero.offload_optimizer.buffer_count, zero.offload_param.buffer_count) == (4, 5)
    assert zero.offload_param.buffer_size == 100_000_000


def test_zero0_and_zero1_fixed_values():
    zero0 = load_quiet(DATA / "zero0.json")
    assert zero0.precision.dtype == "bf16" and zero0.gradient_clipping == 1.0
    assert zero0.train_micro_batch_size_per_gpu == 8 and zero0.train_batch_size is None
    zero1 = load_quiet(DATA / "zero1.json")
    assert zero1.precision.dtype == "fp16" and zero1.optimizer.params["torch_adam"] is True


def test_mapping_covers_every_field():
    mapped = dict(key_mapping())
    assert mapped["zero.prefetch_bucket_size"] == "zero_optimization.stage3_prefetch_bucket_size"
    assert mapped["precision.loss_scale_window"] == "fp16.loss_scale_window"
    assert mapped["zero.offload_param.ratio"] is None


def test_quiet_sample_emits_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config({"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                           "reduce_scatter": True, "reduce_bucket_size": "auto"},
                     "bf16": {"enabled": "auto"}, "gradient_clipping": "auto", "steps_per_print": 10})


def test_stage3_tuning_keys_are_applied_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prefetch, persistence, max live: applied; the rest quiet
        config = load_config(DATA / "zero3.json")  # flops_profiler/tensorboard disabled: not named
    assert config.zero.max_live_parameters == 1_000_000_000
    for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters"):
        assert f"zero_optimization.{key}" not in NOT_APPLIED


def test_not_applied_keys_one_warning_naming_all():
    raw = sample("zero3.json")
    raw["aio"] = {"block_size": 1048576}
    raw["flops_profiler"]["enabled"] = True
    raw["zero_optimization"]["round_robin_gradients"] = True
    with pytest.warns(UserWarning) as record:
        config = load_config(raw, source="zero3.json")
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(
        "hf_zero accepts but does not apply these keys of zero3.json: "
        "aio, flops_profiler, zero_optimization.round_robin_gradients ("
    )
    assert NOT_APPLIED["aio"].reason in message
    assert config.zero.round_robin_gradients is True  # still read and validated


def test_not_applied_values_are_still_validated():
    with pytest.raises(ConfigError, match=r"zero_optimization.contiguous_gradients = \"yes\" in <dict>: not a boolean"):
        load_quiet({"zero_optimization": {"contiguous_gradients": "yes"}})


def test_steps_per_print_other_than_default_warns():
    with pytest.warns(UserWarning, match=r"keys of .*zero3_nvme.json: aio, steps_per_print \("):
        load_config(DATA / "zero3_nvme.json")


def test_param_offload_below_stage3_is_ignored_with_warning():
    raw = {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu", "pin_memory": True}}}
    with pytest.warns(UserWarning, match="zero_optimization.offload_param"):
        config = load_config(raw)
    assert config.zero.offload_param.device == "none"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"zero_optimization": {"reduce_bucket_sise": 1}},
         "unknown key 'zero_optimization.reduce_bucket_sise' in zero2.json; did you mean 'reduce_bucket_size'?"),
        ({"gradient_cliping": 1.0}, "unknown key 'gradient_cliping' in zero2.json; did you mean 'gradient_clipping'?"),
        ({"zero_optimization": {"offload_optimizer": {"devce": "cpu"}}},
         "unknown key 'zero_optimization.offload_optimizer.devce' in zero2.json; did you mean 'device'?"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "ratio": 0.5}}},
         "unknown key 'zero_optimization.offload_param.ratio' in zero2.json; "
         "'ratio' belongs under 'zero_optimization.offload_optimizer'"),
        ({"zero_optimization": {"offload_param": {"qqq": 1}}},
         "unknown key 'zero_optimization.offload_param.qqq' in zero2.json; valid keys under "
         "'zero_optimization.offload_param': buffer_count, buffer_size, device, max_in_cpu, nvme_path, pin_memory"),
        ({"stage": 2}, "unknown key 'stage' in zero2.json; 'stage' belongs under 'zero_optimization'"),
        ({"fp16": {"enable": True}}, "unknown key 'fp16.enable' in zero2.json; did you mean 'enabled'?"),
        ({"optimizer": {"type": "AdamW", "param": {}}},
         "unknown key 'optimizer.param' in zero2.json; did you mean 'params'?"),
        ({"zero_optimization": {"aio": {}}},
         "unknown key 'zero_optimization.aio' in zero2.json; 'aio' belongs at the top level"),
        ({"xyzzy": 1},
         "unknown key 'xyzzy' in zero2.json; valid keys at the top level: activation_checkpointing, aio,"),
    ],
)
def test_unknown_keys(raw, message):
    with pytest.raises(ConfigError) as err:
        load_config(raw, source="zero2.json")
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"zero_optimization": {"reduce_bucket_size": -5}},
         "zero_optimization.reduce_bucket_size = -5 in zero2.json: out of range; allowed: an integer >= 1 or \"auto\""),
        ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "big"}},
         "zero_optimization.stage3_prefetch_bucket_size = \"big\" in zero2.json: not an integer"),
        ({"zero_optimization": {"stage3_gather_fp16_weights_on_model_save": 1}},
         "zero_optimization.stage3_gather_fp16_weights_on_model_save = 1 in zero2.json: not a boolean"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
         "zero_optimization.offload_param.nvme_path = null in zero2.json: required when device is \"nvme\""),
        ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "none", "ratio": 0.3}}},
         "zero_optimization.offload_optimizer.ratio = 0.3 in zero2.json: partial offload needs an offload device"),
        ({"fp16": {"enabled": True, "loss_scale_window": 0}},
         "fp16.loss_scale_window = 0 in zero2.json: out of range; allowed: an integer >= 1"),
        ({"bf16": {"enabled": "yes"}},
         'bf16.enabled = "yes" in zero2.json: not a boolean; allowed: true, false, "auto" or null'),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}},
         "bf16.enabled and fp16.enabled are both true in zero2.json; enable at most one"),
        ({"optimizer": {"params": {"lr": 1e-3}}}, "missing required key 'optimizer.type' in zero2.json"),
        ({"optimizer": {"type": "SGD", "params": {"momentum": "auto"}}},
         "optimizer.params.momentum = \"auto\" in zero2.json: \"auto\" cannot be filled in for this key"),
        ({"scheduler": []}, "scheduler = [] in zero2.json: not an object; allowed: a JSON object"),
        ({"train_batch_size": 2.5}, "train_batch_size = 2.5 in zero2.json: not an integer"),
        ({"zero_optimization": {"stage3_max_live_parameters": 1, "max_live_parameters": 2}},
         "'zero_optimization.stage3_max_live_parameters' and 'zero_optimization.max_live_parameters' in zero2.json "
         "are the same setting; give only one"),
    ],
)
def test_value_errors_name_the_deepspeed_key(raw, message):
    with pytest.raises(ConfigError) as err:
        load_quiet(raw, source="zero2.json")
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("bf16", "fp16", "dtype"),
    [(True, "auto", "bf16"), ("auto", True, "fp16"), (None, False, "fp32"), (False, False, "fp32"),
     ("auto", False, AUTO), (None, None, AUTO)],
)
def test_precision_switches(bf16, fp16, dtype):
    raw = {}
    if bf16 is not None:
        raw["bf16"] = {"enabled": bf16}
    if fp16 is not None:
        raw["fp16"] = {"enabled": fp16}
    assert load_quiet(raw).precision.dtype == dtype


def test_aliases_map_to_canonical_fields():
    config = load_quiet({"bfloat16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "stage3_gather_fp16_weights_on_model_save": True, "prefetch_bucket_size": 7}})
    assert config.precision.dtype == "bf16"
    assert config.zero.gather_16bit_weights_on_model_save is True and config.zero.prefetch_bucket_size == 7


def test_null_blocks_mean_absent():
    config = load_quiet({"optimizer": None, "scheduler": None, "zero_optimization": None})
    assert config.optimizer is None and config.scheduler is None and config.zero.stage == 0
