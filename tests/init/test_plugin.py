"""``zero3_init_flag`` (on by default at stage 3): the script's own ``from_pretrained`` loads sharded
while hf_zero is active, and every load it cannot serve is transformers' own, with a warning
saying why, once per job."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM

from hf_zero.testing.multiprocess import run_on_ranks
from tests.init.test_sharded_load import _llama_dir
from tests.trainer import tiny

FLAG = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "zero3_init_flag": True}}


def _script(rank, world, path, out, config, bf16=False):
    """What a user's script does: from_pretrained, Trainer, train, save; hf_zero only activated."""
    import hf_zero.init as zi
    import hf_zero.trainer as zt
    from transformers import Trainer

    zt.activate(config)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = AutoModelForCausalLM.from_pretrained(path)
            sharded = zi.engine_of(model) is not None
            trainer = Trainer(model=model, args=tiny.args(out, max_steps=3, max_grad_norm=1.0, bf16=bf16),
                              train_dataset=tiny.lm_rows(16))
            trainer.train()
        return {"sharded": sharded, "history": tiny.history(trainer),
                "dtype": str(zi.engine_of(model).units[0].buffer.dtype) if sharded else None,
                "warnings": [str(w.message) for w in caught if "at load" in str(w.message)]}
    finally:
        zt.deactivate()


def test_flag_loads_the_scripts_from_pretrained_sharded(tmp_path):
    path = _llama_dir(str(tmp_path), tied=False)
    default = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}  # unset: on at stage 3
    opt_out = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "zero3_init_flag": False}}
    flagged = run_on_ranks(_script, 2, path, str(tmp_path / "a"), FLAG)
    by_default = run_on_ranks(_script, 2, path, str(tmp_path / "c"), default)
    plain = run_on_ranks(_script, 2, path, str(tmp_path / "b"), opt_out)
    assert flagged[0]["sharded"] and flagged[1]["sharded"] and by_default[0]["sharded"] and not plain[0]["sharded"]
    tiny.same_training(flagged[0]["history"], plain[0]["history"], 3, "flag vs load then shard")
    tiny.same_training(by_default[0]["history"], plain[0]["history"], 3, "default vs load then shard")


def test_a_bf16_run_of_an_fp32_load_is_laid_out_again(tmp_path):
    """The load keeps the checkpoint's fp32 (precision "auto" is unknown then); the Trainer runs bf16."""
    path = _llama_dir(str(tmp_path), tied=False)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    config = {"zero_optimization": zero, "bf16": {"enabled": "auto"}}
    opt_out = {"zero_optimization": {**zero, "zero3_init_flag": False}, "bf16": {"enabled": "auto"}}
    sharded = run_on_ranks(_script, 2, path, str(tmp_path / "a"), config, True)
    plain = run_on_ranks(_script, 2, path, str(tmp_path / "b"), opt_out, True)
    assert sharded[0]["sharded"] and sharded[0]["dtype"] == "torch.bfloat16"
    assert len(sharded[0]["warnings"]) == 1 and not sharded[1]["warnings"], sharded[0]["warnings"]
    assert "the training dtype (bf16 / fp16 / fp32): torch.float32 at load, torch.bfloat16" in sharded[0]["warnings"][0]
    tiny.same_training(sharded[0]["history"], plain[0]["history"], 3, "bf16 run: laid out again vs load then shard")


def test_default_is_on_at_stage_3_only():
    from hf_zero.config import load_config

    def flag(zero):
        return load_config({"zero_optimization": zero}).zero.zero3_init_flag

    assert flag({"stage": 3}) is True and flag({"stage": 2}) is False and flag({"stage": 0}) is False
    assert flag({"stage": 3, "zero3_init_flag": False}) is False


def test_loads_it_cannot_serve_are_transformers_own(tmp_path, monkeypatch):
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
        with pytest.warns(UserWarning, match=r"zero3_init_flag: .* loads whole \(the checkpoint lacks score.weight"):
            loaded = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)  # a new head
        assert zi.engine_of(loaded) is None and loaded.score.weight.shape == (3, 16)
        with warnings.catch_warnings():  # the same fallback again: said once per job
            warnings.simplefilter("error")
            AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        quantized = _llama_dir(str(tmp_path / "q"), tied=False)
        with open(os.path.join(quantized, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(quantized, "config.json"), "w") as f:
            json.dump({**config, "quantization_config": {"quant_method": "made-up"}}, f)
        from hf_zero.init.plugin import why_not

        assert why_not(quantized, (), {}) == "a quantized checkpoint (quantization_config in its config)"
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        (adapter / "adapter_model.safetensors").write_bytes(b"")
        assert why_not(str(adapter), (), {}) == "a PEFT adapter directory"
        os.remove(os.path.join(path, "model.safetensors"))
        torch.save({}, os.path.join(path, "pytorch_model.bin"))
        with pytest.warns(UserWarning, match=r"loads whole \(the checkpoint lacks model.embed_tokens.weight"):
            loaded = AutoModelForCausalLM.from_pretrained(path)  # transformers' own (.bin) load
        assert zi.engine_of(loaded) is None
        os.remove(os.path.join(path, "pytorch_model.bin"))
        with pytest.warns(UserWarning, match=r"loads whole \(no weight files \(model.safetensors or"):
            with pytest.raises(OSError, match="no file named"):  # transformers' own error then
                AutoModelForCausalLM.from_pretrained(path)
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        assert why_not("hf-zero-test/not-cached", (), {}).startswith("a hub id with the hub online")
        assert why_not("hf-zero-test/not-cached", (), {"local_files_only": True, "cache_dir": str(tmp_path)}) == \
            "a hub id not in the local cache at revision main"
    finally:
        zt.deactivate()
    assert zi.engine_of(AutoModelForCausalLM.from_pretrained(_llama_dir(str(tmp_path / "x"), tied=True))) is None
