"""hf_zero's own schema: loading, errors under hf_zero key paths, and the config_to_dict round trip."""

from __future__ import annotations

import json
import warnings

import pytest

from hf_zero.config import AUTO, ConfigError, HfZeroConfig, config_to_dict, load_config
from tests.config.helpers import DATA, SAMPLES, load_quiet

EXAMPLE = {
    "hf_zero": 1,
    "zero": {"stage": 2, "reduce_bucket_size": 50000000, "offload_optimizer": {"device": "cpu"}},
    "precision": {"dtype": "bf16"},
    "gradient_clipping": "auto",
}


def test_example_from_the_docs():
    config = load_config(EXAMPLE)
    assert config.zero.stage == 2 and config.zero.reduce_bucket_size == 50_000_000
    assert config.zero.offload_optimizer.device == "cpu" and config.precision.dtype == "bf16"
    assert config.gradient_clipping is AUTO and config.source == "<dict>"


def test_offload_param_gets_deepspeed_buffer_count():
    config = load_config({"hf_zero": 1, "zero": {"stage": 3, "offload_param": {"device": "cpu"},
                                                  "offload_optimizer": {"device": "cpu"}}})
    assert config.zero.offload_param.buffer_count == 5


@pytest.mark.parametrize("name", SAMPLES)
def test_round_trip_of_samples(name):
    config = load_quiet(DATA / name)
    plain = config_to_dict(config)
    assert json.loads(json.dumps(plain)) == plain  # JSON-able
    assert load_quiet(plain) == config


def test_round_trip_of_defaults_is_silent():
    plain = config_to_dict(HfZeroConfig())
    assert plain["hf_zero"] == 1 and plain["precision"]["dtype"] == "auto" and "source" not in plain
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(plain) == HfZeroConfig()


def test_not_applied_fields_warn_under_hf_zero_names():
    with pytest.warns(UserWarning, match=r"keys of <dict>: steps_per_print, zero.round_robin_gradients \("):
        load_config({"hf_zero": 1, "zero": {"round_robin_gradients": True}, "steps_per_print": 100})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"hf_zero": 1, "zero": {"reduce_bucket_sise": 1}},
         "unknown key 'zero.reduce_bucket_sise' in <dict>; did you mean 'reduce_bucket_size'?"),
        ({"hf_zero": 1, "precison": {}}, "unknown key 'precison' in <dict>; did you mean 'precision'?"),
        ({"hf_zero": 1, "zero": {"stage": 3, "offload_param": {"device": "nvme"}}},
         "zero.offload_param.nvme_path = null in <dict>: required when device is \"nvme\""),
        ({"hf_zero": 1, "zero": {"stage": 2, "offload_param": {"device": "cpu"}}},
         "zero.offload_param.device = \"cpu\" in <dict>: parameter offload needs ZeRO stage 3"),
        ({"hf_zero": 1, "precision": {"dtype": "half"}},
         "precision.dtype = \"half\" in <dict>: not a valid choice; allowed: one of 'fp32', 'bf16', 'fp16' or \"auto\""),
        ({"hf_zero": 1, "precision": None}, "precision = null in <dict>: not an object; allowed: a JSON object"),
        ({"hf_zero": 1, "optimizer": {"params": {}}}, "missing required key 'optimizer.type' in <dict>"),
        ({"hf_zero": 1, "scheduler": {"type": "WarmupLR", "params": {"gamma": "auto"}}},
         "scheduler.params.gamma = \"auto\" in <dict>: \"auto\" cannot be filled in for this key"),
        ({"hf_zero": 2}, "hf_zero = 2 in <dict>: unsupported hf_zero schema version; allowed: 1"),
        ({"hf_zero": True}, "hf_zero = true in <dict>: unsupported hf_zero schema version"),
        ({"hf_zero": "1"}, "hf_zero = \"1\" in <dict>: unsupported hf_zero schema version"),
        ({"hf_zero": 1, "source": "x"}, "unknown key 'source' in <dict>"),
    ],
)
def test_errors(raw, message):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert message in str(err.value)


def test_null_optional_blocks():
    config = load_config({"hf_zero": 1, "optimizer": None, "scheduler": None, "train_batch_size": None})
    assert config.optimizer is None and config.train_batch_size is None


def test_config_to_dict_needs_a_config():
    with pytest.raises(TypeError):
        config_to_dict({"hf_zero": 1})
