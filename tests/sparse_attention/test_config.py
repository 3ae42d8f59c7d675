"""The ``sparse_attention`` block read from a DeepSpeed file: DeepSpeed's defaults per mode, its checks as
errors that name the key, keys a mode does not read warned about, and the native schema round trip."""

from __future__ import annotations

import warnings

import pytest

from hf_zero.config import ConfigError, config_to_dict, load_config
from hf_zero.config.sparse_attention import SparseAttentionConfig


def test_deepspeed_defaults():
    """deepspeed/runtime/constants.py's SPARSE_*_DEFAULT values (bigbird's random blocks: the JSON's 0)."""
    config = load_config({"sparse_attention": {}}).sparse_attention
    assert (config.mode, config.block, config.different_layout_per_head) == ("fixed", 16, False)
    assert (config.num_local_blocks, config.num_global_blocks, config.attention) == (4, 1, "bidirectional")
    assert (config.horizontal_global_attention, config.num_different_global_patterns) == (False, 1)
    assert (config.num_random_blocks, config.local_window_blocks, config.global_block_indices) == (0, (4,), (0,))
    assert (config.global_block_end_indices, config.num_sliding_window_blocks) == (None, 3)
    assert load_config({"sparse_attention": {"mode": "bigbird"}}).sparse_attention.num_random_blocks == 0
    assert load_config({}).sparse_attention is None


def test_round_trip_through_the_native_schema():
    config = load_config({"sparse_attention": {"mode": "variable", "block": 64, "local_window_blocks": [2, 4],
                                               "global_block_indices": [0, 8], "global_block_end_indices": [2, 9]}})
    again = load_config(config_to_dict(config))
    assert again.sparse_attention == config.sparse_attention
    assert again.sparse_attention.local_window_blocks == (2, 4)
    assert hash(again.sparse_attention) == hash(config.sparse_attention)


@pytest.mark.parametrize("block, match", [
    ({"mode": "fixd"}, r"sparse_attention.mode = \"fixd\".*one of 'dense', 'fixed'"),
    ({"block": 0}, r"sparse_attention.block = 0.*>= 1"),
    ({"attention": "causal"}, r"sparse_attention.attention = \"causal\".*'unidirectional', 'bidirectional'"),
    ({"num_local_blocks": 4, "num_global_blocks": 3}, r"num_global_blocks = 3.*a divisor of 4"),
    ({"num_different_global_patterns": 2}, r"num_different_global_patterns = 2.*different_layout_per_head"),
    ({"num_different_global_patterns": 5, "different_layout_per_head": True}, r"from 1 to 4"),
    ({"horizontal_global_attention": True, "attention": "unidirectional"}, r"horizontal_global_attention = true"),
    ({"mode": "variable", "global_block_indices": [0, 3], "global_block_end_indices": [2]}, r"1 ends for 2 starts"),
    ({"mode": "bslongformer", "global_block_indices": [4], "global_block_end_indices": [4]},
     r"end 4 is not after its start 4"),
    ({"mode": "variable", "local_window_blocks": []}, r"local_window_blocks.*at least one"),
    ({"mode": "variable", "local_window_blocks": [2, "4"]}, r"item '4' is not an integer"),
    ({"modes": "fixed"}, r"unknown key 'sparse_attention.modes'.*did you mean 'mode'"),
])
def test_refusals_name_the_key(block, match):
    with pytest.raises(ConfigError, match=match):
        load_config({"sparse_attention": block})


def test_a_key_the_mode_does_not_read_is_warned_about():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config({"sparse_attention": {"mode": "bigbird", "num_local_blocks": 8}})
        SparseAttentionConfig(mode="bigbird", num_sliding_window_blocks=5)  # read by bigbird: no warning
    messages = [str(w.message) for w in caught]
    assert messages == ["sparse_attention.num_local_blocks = 8 is not read in mode 'bigbird' (DeepSpeed ignores it "
                        "too); the keys of that mode: block, different_layout_per_head, num_random_blocks, "
                        "num_sliding_window_blocks, num_global_blocks, attention"]
