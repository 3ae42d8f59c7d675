"""Property: whatever JSON load_config is given, it raises nothing but ConfigError.

Three generators: arbitrary JSON, DeepSpeed samples with random edits (drop a key, replace a
value with arbitrary JSON, add a key that is random or valid somewhere else), and hf_zero
schema dicts with the same edits. Whatever loads must survive the config_to_dict round trip.
"""

from __future__ import annotations

import copy
import json
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_zero.config import ConfigError, config_to_dict, load_config
from hf_zero.config.deepspeed import _KNOWN
from hf_zero.config.not_applied import NOT_APPLIED
from tests.config.helpers import SAMPLES, load_quiet, sample

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.sampled_from(["auto", "cpu", "nvme", "none", "bf16", "AdamW"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
KEYS = st.text(max_size=12) | st.sampled_from(sorted({p.rsplit(".", 1)[-1] for p in _KNOWN | set(NOT_APPLIED)}))
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load_or_config_error(obj):
    try:
        config = load_quiet(obj)
    except ConfigError:
        return
    assert load_quiet(config_to_dict(config)) == config


def _containers(tree, out):
    """Every dict in the tree (the places where keys can be dropped or added)."""
    if isinstance(tree, dict):
        out.append(tree)
        for value in tree.values():
            _containers(value, out)
    elif isinstance(tree, list):
        for value in tree:
            _containers(value, out)
    return out


def _mutate(data, tree):
    for _ in range(data.draw(st.integers(1, 4))):
        target = data.draw(st.sampled_from(_containers(tree, [])))
        action = data.draw(st.sampled_from(["drop", "replace", "add"] if target else ["add"]))
        if action == "add":
            target[data.draw(KEYS)] = data.draw(JSON)
        else:
            key = data.draw(st.sampled_from(sorted(target)))
            if action == "drop":
                del target[key]
            else:
                target[key] = data.draw(JSON)
    return tree


@FUZZ
@given(st.dictionaries(KEYS, JSON, max_size=6))
def test_arbitrary_json_objects(raw):
    _load_or_config_error(raw)


@settings(max_examples=20, deadline=None)
@given(JSON)
def test_arbitrary_json_files(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("fuzz") / "config.json"
    path.write_text(json.dumps(value))
    _load_or_config_error(path)


@FUZZ
@given(st.data(), st.sampled_from(SAMPLES))
def test_mutated_deepspeed_configs(data, name):
    _load_or_config_error(_mutate(data, sample(name)))


@settings(max_examples=80, deadline=None)
@given(st.data(), st.sampled_from(SAMPLES))
def test_mutated_native_configs(data, name):
    plain = config_to_dict(load_quiet(sample(name)))
    _load_or_config_error(_mutate(data, copy.deepcopy(plain)))


def test_warnings_are_only_user_warnings():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            load_config({"aio": {}, "zero_optimization": {"stage": 3, "round_robin_gradients": True}})
        except ConfigError:
            raise AssertionError("a valid config failed to load") from None
    assert [w.category for w in record] == [UserWarning]
