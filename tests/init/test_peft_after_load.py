"""PEFT on a model loaded sharded (``zero3_init_flag``): ``get_peft_model`` and
``PeftModel.from_pretrained`` on it give the adapters and the losses of the same script loading the
model whole (sharded when the optimizer is created), and no rank holds the whole base.

CPU gloo ranks, fp32, tiny untied Llama, LoRA on q_proj and v_proj; each rank runs the script with
the flag and without it, in that order."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer

from hf_zero.testing.multiprocess import run_on_ranks
from tests.init.test_sharded_load import _llama_dir
from tests.trainer import tiny

STEPS = 3


def _config(flag: bool, threshold: int) -> dict:
    return {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold,
                                  "zero3_init_flag": flag}}


def _run(path: str, out: str):
    """The user's script: from_pretrained, get_peft_model, evaluate, train, save, evaluate; then a
    new load of the base with the saved adapter (PeftModel.from_pretrained), evaluated and trained."""
    import hf_zero.init as zi
    from peft import LoraConfig, PeftModel, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(path)
    loaded_sharded = zi.engine_of(model) is not None
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # loaded whole: the full base
    torch.manual_seed(0)  # the same adapters' init on every rank and in both runs
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainer = Trainer(model=lora, args=tiny.args(os.path.join(out, "a"), max_steps=STEPS, max_grad_norm=1.0),
                      train_dataset=tiny.lm_rows(16), eval_dataset=tiny.lm_rows(8, seed=1))
    before = trainer.evaluate()["eval_loss"]  # before train(): the load's engine gathers the base
    trainer.train()
    history = tiny.history(trainer)
    engine = zi.engine_of(lora)
    final = os.path.join(out, "final")
    trainer.save_model(final)
    after = trainer.evaluate()["eval_loss"]

    base = AutoModelForCausalLM.from_pretrained(path)
    again = PeftModel.from_pretrained(base, final, is_trainable=True)
    trainer = Trainer(model=again, args=tiny.args(os.path.join(out, "b"), max_steps=STEPS, max_grad_norm=1.0),
                      train_dataset=tiny.lm_rows(16, seed=2), eval_dataset=tiny.lm_rows(8, seed=1))
    reloaded = trainer.evaluate()["eval_loss"]
    trainer.train()
    return {"sharded": loaded_sharded, "before": before, "after": after, "reloaded": reloaded, "final": final,
            "history": history, "history_reloaded": tiny.history(trainer),
            "relaid": engine is not None and zi.engine_of(model) is None,
            "params_bytes": engine.held_bytes()["params"] if loaded_sharded else base_bytes}


def _both(rank, world, path, root, threshold):
    import hf_zero.trainer as zt

    out = {}
    for flag in (True, False):
        zt.activate(_config(flag, threshold))
        try:
            out[flag] = _run(path, os.path.join(root, f"flag-{flag}"))
        finally:
            zt.deactivate()
    return out


@pytest.mark.parametrize("world,threshold", [(2, 0), (2, 40), (4, 0)])
def test_lora_on_a_sharded_load_is_lora_on_a_whole_load(tmp_path, world, threshold):
    path = _llama_dir(str(tmp_path), tied=False)
    ranks = run_on_ranks(_both, world, path, str(tmp_path), threshold, timeout=600)
    sharded, whole = ranks[0][True], ranks[0][False]
    assert sharded["sharded"] and not whole["sharded"]
    assert sharded["relaid"]
    for key in ("before", "after", "reloaded"):
        tiny.close(sharded[key], whole[key], what=f"eval loss {key}")
    assert sharded["after"] != sharded["before"]  # it trained
    tiny.same_training(sharded["history"], whole["history"], STEPS, "get_peft_model, sharded vs whole load")
    tiny.same_training(sharded["history_reloaded"], whole["history_reloaded"], STEPS,
                       "PeftModel.from_pretrained, sharded vs whole load")
    ours = load_file(os.path.join(sharded["final"], "adapter_model.safetensors"))
    ref = load_file(os.path.join(whole["final"], "adapter_model.safetensors"))
    assert sorted(ours) == sorted(ref) and all("lora_" in n for n in ours)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    # the base stays sharded: each rank holds about 1/W of it (the adapters and kept-whole params on top)
    assert sharded["params_bytes"] < whole["params_bytes"] / world * 1.5, (sharded["params_bytes"], whole)


def _add_adapter(rank, world, path, root):
    """LoRA layers added in place (PEFT's ``inject_adapter_in_model``, what transformers'
    ``add_adapter`` calls), no wrapper: the load's engine no longer fits the model's trainable params."""
    import hf_zero.init as zi
    import hf_zero.trainer as zt
    from peft import LoraConfig, inject_adapter_in_model

    out = {}
    for flag in (True, False):
        zt.activate(_config(flag, 0))
        try:
            model = AutoModelForCausalLM.from_pretrained(path)
            loaded = zi.engine_of(model)
            torch.manual_seed(0)
            inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), model)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            trainer = Trainer(model=model, args=tiny.args(os.path.join(root, str(flag)), max_steps=STEPS),
                              train_dataset=tiny.lm_rows(16))
            trainer.train()
            out[flag] = {"history": tiny.history(trainer), "sharded": loaded is not None, "trainable": trainable,
                         "relaid": loaded is not None and zi.engine_of(model) is not loaded}
        finally:
            zt.deactivate()
    return out


def test_adapters_injected_in_place_after_a_sharded_load(tmp_path):
    path = _llama_dir(str(tmp_path), tied=False)
    out = run_on_ranks(_add_adapter, 2, path, str(tmp_path))[0]
    assert out[True]["sharded"] and out[True]["relaid"] and not out[False]["sharded"]
    assert out[True]["trainable"] == out[False]["trainable"] == 2 * (4 * 16 + 16 * 4 + 4 * 16 + 8 * 4)  # adapters only
    tiny.same_training(out[True]["history"], out[False]["history"], STEPS, "add_adapter, sharded vs whole load")
