"""hf_zero.init refuses a zero config this version cannot run (hf_zero/config/unsupported.py) before a
param loads, with the table's message."""

from __future__ import annotations

import pytest

from hf_zero.config import load_config
from hf_zero.config.unsupported import UnsupportedConfig, refusals
from tests.init.test_sharded_load import _llama_dir

STATIC_SCALE = {"fp16": {"enabled": True, "loss_scale": 128}, "zero_optimization": {"stage": 3}}


def test_sharded_load_refuses_what_the_table_refuses(tmp_path):
    import hf_zero.init as zi

    path = _llama_dir(str(tmp_path), tied=False)
    with pytest.raises(UnsupportedConfig) as caught:
        zi.from_pretrained(path, zero_config=STATIC_SCALE)
    assert str(caught.value) == "\n".join(refusals(load_config(STATIC_SCALE)))
