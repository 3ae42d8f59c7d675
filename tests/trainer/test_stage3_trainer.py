"""Stage 3 through the Trainer on 2 gloo ranks: trains like DDP, and ``save_model`` writes full
weights that plain ``from_pretrained`` (no hf_zero) loads to the same logits."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from hf_zero.testing.multiprocess import run_on_ranks

PROBE = torch.arange(12).view(1, 12)


def _ddp_then_zero3(rank, world, job, out, *args):
    """``job`` as plain DDP (``out/ddp``), then at stage 3 (``out/zero3``), in this one rank start."""
    return [job(rank, world, os.path.join(out, name), *args, zero) for name, zero in (("ddp", False), ("zero3", True))]


def _pairs(job, out, *args) -> tuple[list, list]:
    """Every rank's (DDP, stage 3) results of ``job``, from one start."""
    ranks = run_on_ranks(_ddp_then_zero3, 2, job, str(out), *args, timeout=240)
    return [ref for ref, _ in ranks], [got for _, got in ranks]


def _train_and_save(rank, world, out, zero):
    import hf_zero.trainer as zt

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (16, 12), generator=g)]
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=4,
                             per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
                             save_strategy="no", disable_tqdm=True)
    if zero:
        zt.activate({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        trainer.save_model()
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=PROBE).logits  # stage 3: gathered by the forward hooks
        sharded = zero and all(p.numel() == 0 for p in model.parameters())
    finally:
        zt.deactivate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, logits.tolist(), sharded  # plain lists: tensors do not outlive the rank process


def test_stage3_trains_like_ddp_and_saves_loadable_weights(tmp_path):
    ref, got = _pairs(_train_and_save, tmp_path)
    ref_losses, ref_logits, _ = ref[0]
    losses, logits, sharded = got[0]
    ref_logits, logits = torch.tensor(ref_logits), torch.tensor(logits)
    assert sharded  # between uses the params really are shards
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert os.path.exists(tmp_path / "zero3" / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "zero3").eval()  # plain transformers
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=PROBE).logits, logits, rtol=1e-5, atol=1e-5)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # still tied


def _t5(rank, world, out, zero):
    import hf_zero.trainer as zt
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    model = T5ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(2)
    src = torch.randint(2, 64, (16, 10), generator=g)
    data = [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": s.flip(0)[:6]} for s in src]
    args = Seq2SeqTrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=3,
                                    per_device_train_batch_size=2, per_device_eval_batch_size=4, learning_rate=1e-2,
                                    logging_steps=1, save_strategy="no", disable_tqdm=True,
                                    predict_with_generate=True, generation_max_length=8)
    if zero:
        zt.activate({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    try:
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
        trainer.train()
        preds = trainer.predict(data[:8]).predictions
    finally:
        zt.deactivate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, preds.tolist()


def test_t5_seq2seq_stage3_trains_and_generates_like_ddp(tmp_path):
    ref, got = _pairs(_t5, tmp_path)
    for (losses, preds), (ref_losses, ref_preds) in zip(got, ref):
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
        assert preds == ref_preds  # generate() under stage 3, encoder and decoder gathered on use


def _checkpointed(rank, world, out, reentrant, zero):
    import hf_zero.trainer as zt

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (16, 12), generator=g)]
    args = TrainingArguments(output_dir=os.path.join(out, f"rank{rank}"), use_cpu=True, report_to="none",
                             max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
                             save_strategy="no", gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": reentrant}, disable_tqdm=True)
    if zero:
        zt.activate({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    finally:
        zt.deactivate()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("reentrant", [False, True])
def test_stage3_gradient_checkpointing_matches_ddp(tmp_path, reentrant):
    """Recomputation inside backward re-runs the unit's forward while its backward is pending:
    the unit must stay gathered until its gradients are in."""
    refs, gots = _pairs(_checkpointed, tmp_path, reentrant)
    ref, got = refs[0], gots[0]
    assert len(got) == 3
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (got, ref)
