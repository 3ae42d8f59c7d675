"""Models sharded as they load (hf_zero.init): the same model as from_pretrained / from_config,
trained by the Trainer exactly as a model sharded after loading, with bounded host memory.

CPU gloo ranks, fp32, tiny Llama (tied and untied embeddings) and tiny T5; one model of a few
hundred MB for the RSS bound."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, T5Config

from hf_zero.testing.multiprocess import RankFailure, run_on_ranks
from tests.trainer import tiny

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _llama_dir(root, tied: bool, seed: int = 0) -> str:
    path = os.path.join(root, f"llama-{'tied' if tied else 'untied'}")
    if not os.path.isdir(path):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=tiny.SEQ,
                          tie_word_embeddings=tied)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def _t5_dir(root) -> str:
    path = os.path.join(root, "t5")
    if not os.path.isdir(path):
        torch.manual_seed(0)
        cfg = T5Config(vocab_size=tiny.VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                       decoder_start_token_id=0, dropout_rate=0.0)
        AutoModelForSeq2SeqLM.from_config(cfg).save_pretrained(path)
    return path


# ---- same model as transformers loads -------------------------------------------------------


def _load_and_compare(rank, world, path, seq2seq, threshold):
    import hf_zero.init as zi

    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    zc = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold}}
    model = zi.from_pretrained(path, zero_config=zc, model_class=cls)
    ref = cls.from_pretrained(path)
    engine = zi.engine_of(model)
    state = engine.full_state_dict(to_cpu_on=None)  # every rank gets the full values
    ids = (torch.arange(2 * tiny.SEQ).view(2, tiny.SEQ) * 5 + 3) % tiny.VOCAB
    kw = {"decoder_input_ids": ids[:, :3]} if seq2seq else {}
    with torch.no_grad():
        logits, ref_logits = model(ids, **kw).logits, ref(ids, **kw).logits
        gen = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False)
        ref_gen = ref.generate(ids[:, :4], max_new_tokens=4, do_sample=False)
    ref_state = ref.state_dict()
    held = engine.held_bytes()["params"]
    return {
        "state": {k: float((v - ref_state[k]).abs().max()) for k, v in state.items()},
        "missing": sorted(set(ref_state) - set(state)),
        "logits": float((logits - ref_logits).abs().max()),
        "generate": gen.tolist() == ref_gen.tolist(),
        "sharded": held < sum(v.numel() * v.element_size() for v in ref_state.values()),
        "units": len(engine.units),
    }


@pytest.mark.parametrize("world,kind,threshold", [(1, "untied", 0), (2, "tied", 0), (2, "untied", 40),
                                                  (4, "untied", 0), (2, "t5", 0)])
def test_from_pretrained_is_the_checkpoint(tmp_path_factory, world, kind, threshold):
    root = str(tmp_path_factory.getbasetemp())
    path = _t5_dir(root) if kind == "t5" else _llama_dir(root, tied=kind == "tied")
    for out in run_on_ranks(_load_and_compare, world, path, kind == "t5", threshold):
        assert out["units"] >= 3
        assert max(out["state"].values()) == 0.0, out["state"]
        assert out["logits"] == 0.0 and out["generate"], out
        # tied duplicates (lm_head.weight, T5's embed_tokens) are the same tensor, not held twice
        assert all(k.endswith("lm_head.weight") or "embed_tokens" in k for k in out["missing"]), out["missing"]
        assert out["sharded"] == (world > 1)


# ---- random init ----------------------------------------------------------------------------


def _random_init(rank, world, seed):
    import hf_zero.init as zi

    torch.manual_seed(1000 + rank)  # different RNG per rank: the seed given must win
    cfg = LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, initializer_range=0.02)
    model = zi.from_config(cfg, zero_config=ZERO3, seed=seed)
    state = zi.engine_of(model).full_state_dict(to_cpu_on=None)
    return {k: v.tolist() for k, v in state.items()}


def test_from_config_same_model_at_any_world_size():
    one = run_on_ranks(_random_init, 1, 7)[0]
    two = run_on_ranks(_random_init, 2, 7)
    other = run_on_ranks(_random_init, 1, 8)[0]
    for name, value in one.items():
        assert two[0][name] == value and two[1][name] == value, name
    w = np.asarray(one["model.layers.0.mlp.up_proj.weight"])
    assert 0.015 < w.std() < 0.025  # initializer_range 0.02, from the model's own _init_weights
    assert np.all(np.asarray(one["model.norm.weight"]) == 1.0)
    assert other["model.layers.0.mlp.up_proj.weight"] != one["model.layers.0.mlp.up_proj.weight"]


# ---- Trainer --------------------------------------------------------------------------------


def _train(rank, world, path, out, lazy):
    import hf_zero.init as zi
    import hf_zero.trainer as zt
    from transformers import Trainer

    # zero3_init_flag false: the script's from_pretrained loads whole (the flag's default would shard it)
    zt.activate(ZERO3 if lazy else {"zero_optimization": {**ZERO3["zero_optimization"], "zero3_init_flag": False}})
    try:
        model = zi.from_pretrained(path) if lazy else AutoModelForCausalLM.from_pretrained(path)
        trainer = Trainer(model=model, args=tiny.args(out, max_steps=4, eval_strategy="no", max_grad_norm=1.0),
                          train_dataset=tiny.lm_rows(16), eval_dataset=tiny.lm_rows(8, seed=1))
        first_eval = trainer.evaluate()["eval_loss"]  # before train(): the engine gathers already
        trainer.train()
        trainer.save_model(os.path.join(out, "final"))
        return {"history": tiny.history(trainer), "eval": first_eval, "prebuilt": zi.engine_of(model) is not None}
    finally:
        zt.deactivate()


def test_trainer_trains_a_sharded_load_as_a_sharded_model(tmp_path):
    path = _llama_dir(str(tmp_path), tied=False)
    lazy = run_on_ranks(_train, 2, path, str(tmp_path / "lazy"), True)
    eager = run_on_ranks(_train, 2, path, str(tmp_path / "eager"), False)
    assert lazy[0]["prebuilt"] and not eager[0]["prebuilt"]
    tiny.close(lazy[0]["eval"], eager[0]["eval"], what="eval before train")
    tiny.same_training(lazy[0]["history"], eager[0]["history"], 4, "sharded load vs load then shard")
    # the final save is plain HF: it loads without hf_zero and equals the other run's
    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lazy" / "final"))
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "eager" / "final"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        tiny.close(x.numpy(), y.numpy(), what=name, elementwise=False)


def _mismatch(rank, world, path, trainer_config, sharded=True):
    import hf_zero.init as zi
    import hf_zero.trainer as zt
    from transformers import Trainer

    model = zi.from_pretrained(path, zero_config=ZERO3) if sharded else None
    zt.activate(trainer_config)
    try:
        model = model if sharded else AutoModelForCausalLM.from_pretrained(path)
        trainer = Trainer(model=model, args=tiny.args("/tmp/unused-hf-zero-mismatch", max_steps=2, max_grad_norm=1.0),
                          train_dataset=tiny.lm_rows(4))
        trainer.train()
        return {"prefetch": zt.session_of(trainer).engine.prefetch_numel, "history": tiny.history(trainer)}
    finally:
        zt.deactivate()


def test_trainer_at_stage_2_is_refused(tmp_path):
    path = _llama_dir(str(tmp_path), tied=False)
    with pytest.raises(RankFailure, match="ZeRO stage 3"):
        run_on_ranks(_mismatch, 1, path, {"zero_optimization": {"stage": 2}})


def test_trainer_with_other_settings_lays_it_out_again(tmp_path):
    path = _llama_dir(str(tmp_path), tied=False)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 123}
    with pytest.warns(UserWarning, match="stage3_prefetch_bucket_size: 50000000 at load, 123 in the Trainer's config"):
        out = _mismatch(0, 1, path, {"zero_optimization": zero})  # in this process: the warning is seen here
    ref = _mismatch(0, 1, path, {"zero_optimization": {**zero, "zero3_init_flag": False}}, sharded=False)
    assert out["prefetch"] == ref["prefetch"] == 123
    tiny.same_training(out["history"], ref["history"], 2, "laid out again vs load then shard")


# ---- bad input ------------------------------------------------------------------------------


def test_bad_input_names_the_file_or_key(tmp_path):
    import hf_zero.init as zi
    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match="not a local directory or a hub id"):
        zi.from_pretrained(str(tmp_path / "nope"), zero_config=ZERO3)
    path = _llama_dir(str(tmp_path), tied=False)
    with pytest.raises(ValueError, match="stage = 2"):
        zi.from_pretrained(path, zero_config={"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="needs a zero config"):
        zi.from_pretrained(path)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1].contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lm_head.weight has shape \[63, 16\], the model's lm_head.weight has \[64, 16\]"):
        zi.from_pretrained(path, zero_config=ZERO3)
    tensors["lm_head.weight"] = torch.zeros(tiny.VOCAB, 16)
    tensors.pop("model.norm.weight")
    tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model.layers.0.mlp.up_proj.weight: not in the checkpoint .* \(and 1 more"):
        zi.from_pretrained(path, zero_config=ZERO3)  # found before any shard is made
    os.remove(weights)
    with pytest.raises(ValueError, match=r"no weight files \(model.safetensors or .* or pytorch_model.bin.index.json\)"):
        zi.from_pretrained(path, zero_config=ZERO3)


# ---- host memory ----------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_model():
    """A model of a few hundred MB for the RSS bounds, its bytes, and its largest tensor's bytes."""
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    return model, sum(sizes), max(sizes)


def _load_rss(rank, world, path):
    import accelerate  # noqa: F401 - imported by the load; counted in the baseline, not the load

    import hf_zero.init as zi
    import hf_zero.trainer.seams  # noqa: F401

    base = _status("VmRSS")
    model = zi.from_pretrained(path, zero_config={"zero_optimization": {"stage": 3}})
    return {"base": base, "peak": _status("VmHWM"),
            "held": zi.engine_of(model).held_bytes()["params"]}


def test_peak_host_rss_is_a_shard(tmp_path):
    """Peak RSS per rank <= model bytes / W + the largest tensor + 1 GiB (the issue's bound), and
    what the load adds is the rank's shard (+ 64 MiB): a rank never holds the whole model, as
    loading then sharding does (that adds at least the model's bytes)."""
    model, model_bytes, largest = rss_model()
    model.save_pretrained(str(tmp_path))
    del model
    assert model_bytes > 400 * 2**20
    world = 2
    for out in run_on_ranks(_load_rss, world, str(tmp_path)):
        assert out["peak"] <= model_bytes / world + largest + 2**30, out
        assert out["peak"] - out["base"] <= model_bytes / world + 64 * 2**20, (out, model_bytes)
        assert out["held"] <= model_bytes / world + 2**20, out


# ---- gathering given params ------------------------------------------------------------------


def _gather_some(rank, world, path):
    import hf_zero.init as zi
    from hf_zero.engine.stage3.units import UnitState

    model = zi.from_pretrained(path, zero_config=ZERO3)
    engine = zi.engine_of(model)
    target = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad(), engine.gathered(modifier_rank=0, params=[target]):  # no optimizer yet: no masters
        full_shape = tuple(target.shape)
        states = sorted(u.state.name for u in engine.units)
        if rank == 0:
            target.fill_(0.5)
        else:
            target.fill_(-1.0)  # discarded: rank 0 is the modifier
    state = engine.full_state_dict(to_cpu_on=None)
    ref = AutoModelForCausalLM.from_pretrained(path).state_dict()
    others = [k for k in state if k != "model.layers.0.mlp.up_proj.weight" and not torch.equal(state[k], ref[k])]
    return {"shape": full_shape, "states": states, "edited": bool((state["model.layers.0.mlp.up_proj.weight"] == 0.5).all()),
            "others_changed": others, "after": sorted({u.state.name for u in engine.units})}


def test_gathered_given_params_keeps_the_modifier_ranks_edits_before_any_optimizer(tmp_path):
    path = _llama_dir(str(tmp_path), tied=False)
    for out in run_on_ranks(_gather_some, 2, path):
        assert out["shape"] == (32, 16)
        assert out["states"].count("UNSHARDED") == 1 and "SHARDED" in out["states"]  # only its unit
        assert out["edited"] and out["others_changed"] == []
        assert out["after"] == ["SHARDED"]
