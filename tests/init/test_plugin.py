"""``zero3_init_flag``: the script's own ``from_pretrained`` loads sharded while hf_zero is active,
and every load the flag cannot serve is transformers' own, with a warning saying why."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_zero.testing.multiprocess import run_on_ranks
from tests.init.test_sharded_load import _llama_dir
from tests.trainer import tiny

FLAG = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "zero3_init_flag": True}}


def _script(rank, world, path, out, config):
    """What a user's script does: from_pretrained, Trainer, train, save; hf_zero only activated."""
    import hf_zero.init as zi
    import hf_zero.trainer as zt
    from transformers import Trainer

    zt.activate(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        sharded = zi.engine_of(model) is not None
        trainer = Trainer(model=model, args=tiny.args(out, max_steps=3, max_grad_norm=1.0),
                          train_dataset=tiny.lm_rows(16))
        trainer.train()
        return {"sharded": sharded, "history": tiny.history(trainer)}
    finally:
        zt.deactivate()


def test_flag_loads_the_scripts_from_pretrained_sharded(tmp_path):
    path = _llama_dir(str(tmp_path), tied=False)
    plain_config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    flagged = run_on_ranks(_script, 2, path, str(tmp_path / "a"), FLAG)
    plain = run_on_ranks(_script, 2, path, str(tmp_path / "b"), plain_config)
    assert flagged[0]["sharded"] and flagged[1]["sharded"] and not plain[0]["sharded"]
    tiny.same_training(flagged[0]["history"], plain[0]["history"], 3, "flag vs load then shard")


def test_loads_it_cannot_serve_are_transformers_own(tmp_path):
    import hf_zero.init as zi
    import hf_zero.trainer as zt

    path = _llama_dir(str(tmp_path), tied=False)
    zt.activate(FLAG)
    try:
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)  # a concrete class: served
        assert zi.engine_of(model) is not None and model.dtype == torch.float32
        for kwargs, why in [({"device_map": "cpu"}, "keyword arguments device_map"),
                            ({"low_cpu_mem_usage": True, "output_loading_info": True}, "low_cpu_mem_usage")]:
            with pytest.warns(UserWarning, match=f"zero3_init_flag: .* loads whole .*{why}"):
                loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            loaded = loaded[0] if isinstance(loaded, tuple) else loaded
            assert zi.engine_of(loaded) is None and loaded.model.embed_tokens.weight.numel() > 0
        os.remove(os.path.join(path, "model.safetensors"))
        torch.save({}, os.path.join(path, "pytorch_model.bin"))
        with pytest.warns(UserWarning, match="no safetensors files"):
            loaded = AutoModelForCausalLM.from_pretrained(path)  # transformers' own (.bin) load
        assert zi.engine_of(loaded) is None
    finally:
        zt.deactivate()
    assert zi.engine_of(AutoModelForCausalLM.from_pretrained(_llama_dir(str(tmp_path / "x"), tied=True))) is None
