"""Tied weights under the sharded load (issue 22): BERT masked LM (decoder tied to the word
embeddings, which live in another unit: [Note: tied params across units] in unit_plan.py), Llama
and Qwen2 with tie_word_embeddings, GPT-2 (lm_head tied to wte), T5 and BART (encoder, decoder
and LM head share one embedding).

Each, at W 2: the sharded load gives transformers' logits and state, with the tie kept; the
model loaded whole then sharded at stage 3 gives them too; through the Trainer, the script's own
``from_pretrained`` loaded sharded (zero3_init_flag, its default) trains as the same model loaded
whole then sharded (zero3_init_flag false), which trains as the plain Trainer; the saved model
loads with transformers' from_pretrained, tied. A model whose declared tie is not made on the meta
device loads whole, the reason said, before any shard is made.

Rank starts: the runs of every kind share one start, made once for the module (``tied_runs``)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, BartConfig, BertConfig,
                          BertForMaskedLM, GPT2Config, LlamaConfig, Qwen2Config, T5Config)

from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer import tiny

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
WHOLE = {"zero_optimization": {**ZERO3["zero_optimization"], "zero3_init_flag": False}}
V, H = tiny.VOCAB, 16


def _model(kind: str):
    """(class, config, seq2seq) of a tiny model of each tied shape; no dropout."""
    if kind == "bert":
        return AutoModelForMaskedLM, BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=32, max_position_embeddings=tiny.SEQ,
                                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), False
    if kind in ("llama", "qwen2"):
        config = LlamaConfig if kind == "llama" else Qwen2Config
        return AutoModelForCausalLM, config(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1,
                                            max_position_embeddings=tiny.SEQ, tie_word_embeddings=True), False
    if kind == "gpt2":
        return AutoModelForCausalLM, GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=2, n_positions=tiny.SEQ,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                bos_token_id=0, eos_token_id=0), False
    if kind == "t5":
        return AutoModelForSeq2SeqLM, T5Config(vocab_size=V, d_model=H, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                               decoder_start_token_id=0, dropout_rate=0.0,
                                               tie_word_embeddings=True), True
    return AutoModelForSeq2SeqLM, BartConfig(vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1,
                                             encoder_attention_heads=2, decoder_attention_heads=2,
                                             encoder_ffn_dim=32, decoder_ffn_dim=32,
                                             max_position_embeddings=tiny.SEQ, dropout=0.0, attention_dropout=0.0,
                                             activation_dropout=0.0), True


def _checkpoint(root: str, kind: str) -> str:
    path = os.path.join(root, kind)
    if not os.path.isdir(path):
        cls, config, _ = _model(kind)
        torch.manual_seed(0)
        cls.from_config(config).save_pretrained(path)
    return path


def untied(model) -> list[str]:
    """The ties transformers declares for ``model`` (target -> source) that are not one Parameter."""
    declared = model.all_tied_weights_keys
    assert declared, type(model).__name__  # every model here has ties
    return [t for t, s in declared.items() if model.get_parameter(t) is not model.get_parameter(s)]


def _inputs(seq2seq: bool) -> dict:
    ids = (torch.arange(2 * tiny.SEQ).view(2, tiny.SEQ) * 5 + 3) % V
    return {"input_ids": ids, **({"decoder_input_ids": ids[:, :3]} if seq2seq else {})}


def _compare(cls, path, seq2seq):
    """The sharded load and the whole load sharded afterwards, each against transformers' own."""
    import hf_zero.init as zi
    from hf_zero.engine import ZeroEngine

    ref = cls.from_pretrained(path)
    inputs = _inputs(seq2seq)
    model = zi.from_pretrained(path, zero_config=ZERO3, model_class=cls)
    whole = cls.from_pretrained(path)
    ZeroEngine(whole, torch.optim.AdamW(whole.parameters()), stage=3, bucket_numel=1)
    with torch.no_grad():
        ref_logits = ref(**inputs).logits
        logits = {"sharded load": model(**inputs).logits, "whole then sharded": whole(**inputs).logits}
    state, ref_state = zi.engine_of(model).full_state_dict(to_cpu_on=None), ref.state_dict()
    return {"logits": {k: float((v - ref_logits).abs().max()) for k, v in logits.items()},
            "state": max(float((v - ref_state[k]).abs().max()) for k, v in state.items()),
            "untied": untied(model) + untied(whole)}


def _train(cls, path, out, seq2seq, config):
    """The user's script: transformers' from_pretrained, Trainer, 2 steps, save. ``config`` None: no hf_zero."""
    import hf_zero.init as zi
    import hf_zero.trainer as zt
    from transformers import Seq2SeqTrainer, Trainer

    if config is not None:
        zt.activate(config)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = cls.from_pretrained(path)
        trainer = (Seq2SeqTrainer if seq2seq else Trainer)(
            model=model, args=tiny.args(out, seq2seq=seq2seq, max_steps=2, max_grad_norm=1.0),
            train_dataset=tiny.s2s_rows(8) if seq2seq else tiny.lm_rows(8))
        trainer.train()
        trainer.save_model(os.path.join(out, "final"))
        return {"history": tiny.history(trainer), "sharded": zi.engine_of(model) is not None,
                "loads_whole": [str(w.message) for w in caught if "loads whole" in str(w.message)]}
    finally:
        if config is not None:
            zt.deactivate()


def _job(rank, world, kind, path, out):
    cls, _, seq2seq = _model(kind)
    return {"compare": _compare(cls, path, seq2seq),
            **{name: _train(cls, path, os.path.join(out, name), seq2seq, config)
               for name, config in (("sharded", ZERO3), ("whole", WHOLE), ("plain", None))}}


KINDS = ["bert", "llama", "qwen2", "gpt2", "t5", "bart"]


def _jobs(rank, world, root):
    """``_job`` for every kind of ``KINDS``, one after another in this one rank start: its checkpoint
    in ``root/kind``, its runs under ``root/runs/kind``."""
    return {kind: _job(rank, world, kind, os.path.join(root, kind), os.path.join(root, "runs", kind)) for kind in KINDS}


@pytest.fixture(scope="module")
def tied_runs(tmp_path_factory):
    """The folder and rank 0's ``_jobs`` results: every kind's checkpoint, then all its runs in one start."""
    root = tmp_path_factory.mktemp("tied")
    for kind in KINDS:
        _checkpoint(str(root), kind)
    return root, run_on_ranks(_jobs, 2, str(root), timeout=600)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_tied_model_loads_trains_and_saves_tied(tied_runs, kind):
    root, runs = tied_runs
    out, runs_dir = runs[kind], root / "runs" / kind
    assert out["compare"]["logits"] == {"sharded load": 0.0, "whole then sharded": 0.0}, out["compare"]
    assert out["compare"]["state"] == 0.0 and out["compare"]["untied"] == [], out["compare"]
    assert out["sharded"]["sharded"] and not out["whole"]["sharded"] and not out["plain"]["sharded"]
    assert out["sharded"]["loads_whole"] == [], out["sharded"]["loads_whole"]
    tiny.same_training(out["sharded"]["history"], out["whole"]["history"], 2, "sharded load vs load then shard")
    tiny.same_training(out["whole"]["history"], out["plain"]["history"], 2, "stage 3 vs the plain Trainer")
    cls = _model(kind)[0]
    saved = cls.from_pretrained(str(runs_dir / "sharded" / "final"))
    other = cls.from_pretrained(str(runs_dir / "whole" / "final")).state_dict()
    assert untied(saved) == []
    # the file holds each tie once, or both names with equal values: transformers keeps the source's
    stored = load_file(os.path.join(str(runs_dir / "sharded" / "final"), "model.safetensors"))
    for target, source in saved.all_tied_weights_keys.items():
        assert source in stored and (target not in stored or torch.equal(stored[target], stored[source])), target
    for name, value in saved.state_dict().items():
        tiny.close(value.numpy(), other[name].numpy(), what=name, elementwise=False)


# ---- a tie the meta model does not make ------------------------------------------------------


class _UntiedOnMeta(BertForMaskedLM):
    """Declares BERT's ties (its class's ``_tied_weights_keys``) but never ties them."""

    def tie_weights(self, *args, **kwargs):
        return None


def test_a_tie_not_made_on_meta_loads_whole_with_the_reason(tmp_path):
    import hf_zero.init as zi
    import hf_zero.trainer as zt
    from hf_zero.init.checkpoint_files import NotServed

    path = _checkpoint(str(tmp_path), "bert")
    with pytest.raises(NotServed, match=r"ties cls.predictions.decoder.weight to bert.embeddings.word_embeddings"):
        zi.from_pretrained(path, zero_config=ZERO3, model_class=_UntiedOnMeta)
    zt.activate(ZERO3)
    try:
        with pytest.warns(UserWarning, match=r"loads whole \(_UntiedOnMeta ties cls.predictions.decoder.weight"):
            model = _UntiedOnMeta.from_pretrained(path)
        assert zi.engine_of(model) is None  # transformers' own load: sharded when the optimizer is created
    finally:
        zt.deactivate()
