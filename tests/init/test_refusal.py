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


TP_STAGE3 = {"zero_optimization": {"stage": 3}, "tensor_parallel": {"autotp_size": 2}}


def test_tensor_parallel_at_stage_3_is_refused_before_a_param_loads(tmp_path):
    """zero3_init_flag unset is true at stage 3: the table's row, before a meta model is even built."""
    import hf_zero.init as zi

    path = _llama_dir(str(tmp_path), tied=False)
    with pytest.raises(UnsupportedConfig) as caught:
        zi.from_pretrained(path, zero_config=TP_STAGE3)
    assert str(caught.value) == "\n".join(refusals(load_config(TP_STAGE3)))
    assert "zero_optimization.zero3_init_flag = true" in str(caught.value)


def test_hf_zero_init_itself_is_refused_with_tensor_parallelism(tmp_path):
    """zero3_init_flag false runs (the Trainer splits a whole model), but calling hf_zero.init then is not built."""
    import hf_zero.init as zi
    from hf_zero.engine.stages import NotAvailableYet

    config = {**TP_STAGE3, "zero_optimization": {"stage": 3, "zero3_init_flag": False}}
    assert refusals(load_config(config)) == []
    path = _llama_dir(str(tmp_path), tied=False)
    with pytest.raises(NotAvailableYet, match=r"hf_zero.init with tensor_parallel.autotp_size = 2 .*load it whole"):
        zi.from_pretrained(path, zero_config=config)
