"""Sharded loads of checkpoints whose load applies transformers' weight conversions: the same
state and logits as transformers' own ``from_pretrained``, at W = 2 on CPU gloo ranks.

- Mixtral: ``block_sparse_moe`` renamed to ``mlp`` and per-expert ``w1``/``w3``/``w2`` fused into
  ``experts.gate_up_proj`` / ``experts.down_proj`` (what save_pretrained writes: transformers
  reverts the fusion on save);
- Qwen2-MoE: per-expert ``gate_proj``/``up_proj``/``down_proj`` fused;
- BERT with legacy ``LayerNorm.gamma`` / ``LayerNorm.beta`` keys, stored with the ``bert.``
  prefix of a model with a head (loaded into ``BertModel``: the prefix is dropped).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, MixtralConfig, Qwen2MoeConfig

from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer import tiny

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _mixtral(root: str) -> str:
    cfg = MixtralConfig(vocab_size=tiny.VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=tiny.SEQ, tie_word_embeddings=False)
    return _save(AutoModelForCausalLM.from_config(cfg), os.path.join(root, "mixtral"))


def _qwen_moe(root: str) -> str:
    cfg = Qwen2MoeConfig(vocab_size=tiny.VOCAB, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                         shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, max_position_embeddings=tiny.SEQ,
                         tie_word_embeddings=False)
    return _save(AutoModelForCausalLM.from_config(cfg), os.path.join(root, "qwen2_moe"))


def _bert_legacy(root: str) -> str:
    cfg = BertConfig(vocab_size=tiny.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=tiny.SEQ)
    path = _save(AutoModel.from_config(cfg), os.path.join(root, "bert"))
    weights = os.path.join(path, "model.safetensors")
    renamed = {}
    for key, value in load_file(weights).items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        renamed["bert." + key] = value  # as a BertFor... checkpoint stores them
    save_file(renamed, weights, metadata={"format": "pt"})
    return path


def _save(model, path: str) -> str:
    torch.manual_seed(0)
    with torch.no_grad():  # every param away from its init value (MoE experts start at zero)
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


def _compare(rank, world, cases):
    import hf_zero.init as zi

    out = {}
    for kind, path in cases:
        cls = AutoModel if kind == "bert" else AutoModelForCausalLM
        model = zi.from_pretrained(path, zero_config=ZERO3, model_class=cls)
        ref = cls.from_pretrained(path)
        state = zi.engine_of(model).full_state_dict(to_cpu_on=None)
        ref_state = ref.state_dict()
        ids = (torch.arange(2 * tiny.SEQ).view(2, tiny.SEQ) * 5 + 3) % tiny.VOCAB
        with torch.no_grad():
            logits, ref_logits = (model(ids)[0], ref(ids)[0])
        out[kind] = {"differ": sorted(k for k, v in state.items() if not torch.equal(v, ref_state[k])),
                     "absent": sorted(set(ref_state) - set(state) - {k for k in ref_state if "position_ids" in k}),
                     "fused": sorted(k for k in state if "experts.gate_up_proj" in k),
                     "logits": float((logits - ref_logits).abs().max()),
                     "conversions": sorted(type(t).__name__ for t in model._weight_conversions),
                     "ref_conversions": sorted(type(t).__name__ for t in ref._weight_conversions),
                     "held": zi.engine_of(model).held_bytes()["params"],
                     "bytes": sum(v.numel() * v.element_size() for v in state.values())}
    return out


def test_converted_checkpoints_load_as_transformers_loads_them(tmp_path):
    cases = [("mixtral", _mixtral(str(tmp_path))), ("qwen2_moe", _qwen_moe(str(tmp_path))),
             ("bert", _bert_legacy(str(tmp_path)))]
    stored = load_file(os.path.join(cases[0][1], "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in stored  # the layout transformers converts
    assert "model.layers.0.mlp.experts.gate_up_proj" not in stored
    for rank_out in run_on_ranks(_compare, 2, cases):
        for kind, out in rank_out.items():
            assert out["differ"] == [] and out["absent"] == [], (kind, out)
            assert out["logits"] == 0.0, (kind, out)
            assert out["conversions"] == out["ref_conversions"], (kind, out)  # what save_pretrained reverts
            assert out["held"] < out["bytes"], (kind, out)  # sharded, fused experts included
        assert rank_out["mixtral"]["fused"] == [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)]
        assert "WeightRenaming" in rank_out["bert"]["conversions"]


def _train(rank, world, path, out, lazy):
    import hf_zero.init as zi
    import hf_zero.trainer as zt
    from transformers import Trainer

    zt.activate({"zero_optimization": {**ZERO3["zero_optimization"], "zero3_init_flag": lazy}})
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        trainer = Trainer(model=model, args=tiny.args(out, max_steps=3, max_grad_norm=1.0),
                          train_dataset=tiny.lm_rows(16))
        trainer.train()
        trainer.save_model(os.path.join(out, "final"))
        return {"history": tiny.history(trainer), "sharded": zi.engine_of(model) is not None}
    finally:
        zt.deactivate()


def test_a_mixtral_checkpoint_trains_and_saves_as_loaded_whole(tmp_path):
    path = _mixtral(str(tmp_path))
    lazy = run_on_ranks(_train, 2, path, str(tmp_path / "lazy"), True)
    whole = run_on_ranks(_train, 2, path, str(tmp_path / "whole"), False)
    assert lazy[0]["sharded"] and not whole[0]["sharded"]
    tiny.same_training(lazy[0]["history"], whole[0]["history"], 3, "Mixtral: sharded load vs load then shard")
    a = load_file(str(tmp_path / "lazy" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    assert sorted(a) == sorted(b) and "model.layers.1.block_sparse_moe.experts.0.w2.weight" in a  # saved back unfused
    for key in a:
        tiny.close(a[key].numpy(), b[key].numpy(), what=key, elementwise=False)
