"""resolve_config: "auto" filled from TrainingArguments, and every disagreement reported."""

from __future__ import annotations

import types

import pytest
from transformers import TrainingArguments

from hf_zero.config import AUTO, ConfigError, HfZeroConfig, config_to_dict, resolve_config
from tests.config.helpers import DATA, load_quiet, sample


@pytest.fixture
def make_args(tmp_path):
    def make(**kwargs):
        return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs)

    return make


def _autos(value, path=""):
    """Paths of every "auto" left in a config_to_dict tree."""
    if value == "auto":
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _autos(v, f"{path}.{k}" if path else k)]
    return []


def test_zero2_autos_filled_from_training_arguments(make_args):
    args = make_args(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.5, bf16=True,
                     learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.1,
                     warmup_steps=10)
    config = resolve_config(load_quiet(DATA / "zero2.json"), args, world_size=2, num_training_steps=100)
    assert (config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (4, 2)
    assert config.train_batch_size == 16
    assert config.gradient_clipping == 0.5 and config.precision.dtype == "bf16"
    assert config.optimizer.params == {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1}
    assert config.scheduler.params == {"warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 10}
    assert config.zero.reduce_bucket_size == 200_000_000  # a number in the file stays
    assert _autos(config_to_dict(config)) == []


def test_zero3_hidden_size_autos(make_args):
    config = resolve_config(load_quiet(DATA / "zero3_nvme.json"), make_args(), world_size=1, hidden_size=64)
    zero = config.zero
    assert zero.reduce_bucket_size == 64 * 64
    assert zero.prefetch_bucket_size == int(0.9 * 64 * 64)
    assert zero.param_persistence_threshold == 640
    assert zero.gather_16bit_weights_on_model_save is True
    assert config.precision.dtype == "fp32"
    assert _autos(config_to_dict(config)) == []


def test_without_hidden_size_deepspeed_defaults_are_used(make_args):
    zero = resolve_config(load_quiet(DATA / "zero3.json"), make_args(), world_size=1).zero
    assert (zero.reduce_bucket_size, zero.prefetch_bucket_size, zero.param_persistence_threshold) == (
        500_000_000, 50_000_000, 100_000)


def test_scheduler_step_counts_wait_for_num_training_steps(make_args):
    config = resolve_config(load_quiet(DATA / "zero1.json"), make_args(fp16=True), world_size=1)
    params = config.scheduler.params
    assert params["warmup_num_steps"] is AUTO and params["total_num_steps"] is AUTO
    assert params["warmup_min_lr"] == 0 and params["warmup_max_lr"] == 5e-5
    left = _autos(config_to_dict(config))
    assert left == ["scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps"]
    done = resolve_config(config, make_args(fp16=True, warmup_steps=0.1), world_size=1, num_training_steps=50)
    assert (done.scheduler.params["warmup_num_steps"], done.scheduler.params["total_num_steps"]) == (5, 50)


def test_no_warmup_still_gives_one_step(make_args):
    args = make_args(fp16=True)
    config = resolve_config(load_quiet(DATA / "zero1.json"), args, world_size=1, num_training_steps=9)
    assert config.scheduler.params["warmup_num_steps"] == 1


def test_absent_batch_sizes_are_filled(make_args):
    config = resolve_config(HfZeroConfig(), make_args(per_device_train_batch_size=3), world_size=4)
    batch = (config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps, config.train_batch_size)
    assert batch == (3, 1, 12)
    assert config.gradient_clipping == 1.0


def test_resolving_twice_changes_nothing(make_args):
    args = make_args()
    once = resolve_config(load_quiet(DATA / "zero2.json"), args, world_size=2, hidden_size=8, num_training_steps=10)
    assert resolve_config(once, args, world_size=2, hidden_size=8, num_training_steps=10) == once


def test_message_for_a_conflict(make_args):
    raw = sample("zero2.json") | {"gradient_accumulation_steps": 4}
    with pytest.raises(ConfigError) as err:
        resolve_config(load_quiet(raw, source="zero2.json"), make_args(), world_size=1)
    assert str(err.value) == (
        "gradient_accumulation_steps = 4 in zero2.json but TrainingArguments.gradient_accumulation_steps = 1; "
        'make them equal or set the file\'s value to "auto"'
    )


Z2 = "in z.json but TrainingArguments"


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        ({"train_micro_batch_size_per_gpu": 16},
         f"train_micro_batch_size_per_gpu = 16 {Z2}.per_device_train_batch_size = 8"),
        ({"gradient_clipping": 0.3}, f"gradient_clipping = 0.3 {Z2}.max_grad_norm = 1.0"),
        ({"bf16": {"enabled": True}},
         f'precision.dtype (DeepSpeed: bf16.enabled / fp16.enabled) = "bf16" {Z2}.bf16/fp16 = "fp32"'),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
         f"optimizer.params.lr = 0.001 {Z2}.learning_rate = 5e-05"),
        ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}},
         f"optimizer.params.betas = [0.9, 0.95] {Z2}.adam_beta1, adam_beta2 = [0.9, 0.999]"),
        ({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}},
         f"optimizer.params.eps = 1e-06 {Z2}.adam_epsilon = 1e-08"),
        ({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.01}}},
         f"optimizer.params.weight_decay = 0.01 {Z2}.weight_decay = 0.0"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1.0}}},
         f"scheduler.params.warmup_max_lr = 1.0 {Z2}.learning_rate = 5e-05"),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 7}}},
         f"scheduler.params.total_num_steps = 7 {Z2}.max_steps (num_training_steps) = 100"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 7}}},
         f"scheduler.params.warmup_num_steps = 7 {Z2}.warmup_steps = 1"),
        ({"train_batch_size": 32},
         "train_batch_size = 32 in z.json but train_micro_batch_size_per_gpu (8) * "
         "gradient_accumulation_steps (1) * world_size (2) = 16"),
        ({"train_batch_size": 15}, "train_batch_size = 15 in z.json is not divisible by world_size = 2"),
    ],
)
def test_each_conflict_is_detected(make_args, edit, fragment):
    config = load_quiet(sample("zero2.json") | edit, source="z.json")
    with pytest.raises(ConfigError) as err:
        resolve_config(config, make_args(), world_size=2, num_training_steps=100)
    assert fragment in str(err.value)


def test_all_conflicts_reported_at_once(make_args):
    config = load_quiet({"gradient_accumulation_steps": 3, "gradient_clipping": 2.0}, source="z.json")
    with pytest.raises(ConfigError) as err:
        resolve_config(config, make_args(), world_size=1)
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("gradient_accumulation_steps") and lines[1].startswith("gradient_clipping")


def test_matching_values_pass(make_args):
    raw = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
           "gradient_clipping": 1, "fp16": {"enabled": True}}
    config = resolve_config(load_quiet(raw), make_args(gradient_accumulation_steps=2, fp16=True), world_size=2)
    assert config.train_batch_size == 32 and config.precision.dtype == "fp16"


def test_auto_find_batch_size_keeps_the_files_micro_batch(make_args):
    config = load_quiet({"train_micro_batch_size_per_gpu": 2})
    resolved = resolve_config(config, make_args(auto_find_batch_size=True), world_size=1)
    assert resolved.train_micro_batch_size_per_gpu == 2 and resolved.train_batch_size == 2


def _namespace(**overrides):
    fields = dict(per_device_train_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=1.0, bf16=False,
                  fp16=False, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                  weight_decay=0.0, warmup_steps=0.25)
    return types.SimpleNamespace(**(fields | overrides))


def test_duck_typed_training_arguments():
    args = _namespace(fp16=True, gradient_accumulation_steps=1)
    config = resolve_config(load_quiet(DATA / "zero1.json"), args, world_size=2, num_training_steps=40)
    assert config.train_batch_size == 4 and config.scheduler.params["warmup_num_steps"] == 10


def test_both_precisions_in_training_arguments():
    with pytest.raises(ConfigError, match="TrainingArguments asks for both bf16 and fp16"):
        resolve_config(HfZeroConfig(), _namespace(bf16=True, fp16=True), world_size=1)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"world_size": 0}, "world_size = 0"), ({"world_size": 1, "hidden_size": 1.5}, "hidden_size = 1.5"),
     ({"world_size": 1, "num_training_steps": -1}, "num_training_steps = -1")],
)
def test_bad_keyword_arguments(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve_config(HfZeroConfig(), _namespace(), **kwargs)


def test_needs_a_config():
    with pytest.raises(TypeError):
        resolve_config({"zero_optimization": {}}, _namespace(), world_size=1)
