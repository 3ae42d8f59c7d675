"""load_config's input handling: paths, dicts, configs, and unreadable or malformed files."""

from __future__ import annotations

import pathlib
import re

import pytest

from hf_zero.config import ConfigError, HfZeroConfig, load_config
from tests.config.helpers import DATA, load_quiet


def test_path_forms_and_source(write_json):
    path = write_json({"zero_optimization": {"stage": 1}}, "zero1.json")
    assert load_config(path).source == str(path)
    assert load_config(str(path)).zero.stage == 1
    assert load_config(path, source="mine.json").source == "mine.json"


def test_dict_and_config_inputs():
    assert load_config({}).source == "<dict>"
    config = load_quiet(DATA / "zero2.json")
    assert load_config(config) is config


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "zero9.json"
    with pytest.raises(ConfigError, match=f"config file not found: {path}"):
        load_config(path)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError, match=f"cannot read config file {tmp_path}"):
        load_config(tmp_path)


def test_invalid_json_names_file_line_column(write_json):
    path = write_json('{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}\n', "broken.json")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"invalid JSON in {path} at line 4, column 3" in str(err.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"x": "\xff"}')
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(path)


@pytest.mark.parametrize(("text", "shown"), [("[1, 2]", "[1, 2]"), ('"zero"', '"zero"'), ("null", "null")])
def test_top_level_must_be_an_object(write_json, text, shown):
    path = write_json(text, "list.json")
    expected = f"the top level of {path} must be a JSON object, not {shown}"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(path)


def test_duplicate_keys_are_errors(write_json):
    path = write_json('{"zero_optimization": {"stage": 1, "stage": 2}}', "dup.json")
    with pytest.raises(ConfigError, match=f"duplicate key 'stage' in {path}"):
        load_config(path)


@pytest.mark.parametrize("bad", [42, None, [("zero_optimization", {})], b"zero.json"])
def test_other_inputs(bad):
    with pytest.raises(ConfigError, match="cannot load a config from a"):
        load_config(bad)


def test_non_string_keys_in_dict():
    with pytest.raises(ConfigError, match="key 1 under the top level is not a string"):
        load_config({1: 2})


def test_returns_hfzeroconfig_for_every_sample():
    for path in pathlib.Path(DATA).glob("*.json"):
        assert isinstance(load_quiet(path), HfZeroConfig)
