"""Trainer checkpoints under hf_zero resume the same run: on CPU fp32 at the same world size and
stage, the losses after resuming equal the uninterrupted run's bit for bit. Mismatched resumes
are refused before training, naming the file and what differs."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from hf_zero.testing.multiprocess import RankFailure, run_on_ranks


def _run(rank, world, out, stage, resume_from):
    import hf_zero.trainer as zt

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (48, 12), generator=g)]
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=6, save_steps=3,
                             per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                             weight_decay=0.1, warmup_steps=2, logging_steps=1, disable_tqdm=True, seed=0)
    zt.activate({"zero_optimization": {"stage": stage}})
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume_from if resume_from in (None, True) else str(resume_from))
    finally:
        zt.deactivate()
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return losses if resume_from is not True else trainer.state.global_step


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_is_bitwise_identical(tmp_path, stage):
    full = run_on_ranks(_run, 2, tmp_path / "a", stage, None, timeout=300)[0]
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("hf_zero_optim")) == [
        "hf_zero_optim_rank0_of_2.pt", "hf_zero_optim_rank1_of_2.pt"]
    resumed = run_on_ranks(_run, 2, tmp_path / "b", stage, ckpt, timeout=300)[0]
    assert {4, 5, 6} <= set(resumed)  # (steps 1-3 come back with the restored trainer state)
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]


def test_resume_refuses_another_stage_or_world_size(tmp_path):
    run_on_ranks(_run, 2, tmp_path / "a", 2, None, timeout=300)
    ckpt = tmp_path / "a" / "checkpoint-3"
    with pytest.raises(RankFailure, match="written at zero_optimization.stage 2, this run uses stage 1"):
        run_on_ranks(_run, 2, tmp_path / "b", 1, ckpt, timeout=300)
    with pytest.raises(RankFailure, match="world size 1, but the checkpoint holds hf_zero_optim_rank0_of_2.pt"):
        run_on_ranks(_run, 1, tmp_path / "c", 2, ckpt, timeout=300)
    for name in ("hf_zero_optim_rank0_of_2.pt", "hf_zero_optim_rank1_of_2.pt"):
        assert (ckpt / name).exists()  # a refused resume never touches the checkpoint


def test_resume_true_skips_an_incomplete_newest_checkpoint(tmp_path):
    import shutil

    run_on_ranks(_run, 2, tmp_path / "a", 2, None, timeout=300)
    for step in (3, 6):
        assert (tmp_path / "a" / f"checkpoint-{step}" / "hf_zero_complete.json").exists()
    # A save cut short: the newest folder lacks the marker (and a rank's shard).
    broken = tmp_path / "a" / "checkpoint-3"
    shutil.copytree(tmp_path / "a" / "checkpoint-6", tmp_path / "a" / "checkpoint-9")
    for name in ("hf_zero_complete.json", "hf_zero_optim_rank1_of_2.pt"):
        (tmp_path / "a" / "checkpoint-9" / name).unlink()
    steps = run_on_ranks(_run, 2, tmp_path / "a", 2, True, timeout=300)
    assert steps == [6, 6]  # resumed from checkpoint-6, not the incomplete checkpoint-9
    assert broken.exists()


def _best(rank, world, out, stage):
    import hf_zero.trainer as zt
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 64, (24, 12), generator=g)
    data = [{"input_ids": i, "labels": i} for i in rows]
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=6, save_steps=2,
                             eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                             metric_for_best_model="eval_loss", greater_is_better=True,  # pick a non-last one
                             per_device_train_batch_size=2, learning_rate=5e-2, logging_steps=1,
                             disable_tqdm=True, seed=0)
    zt.activate({"zero_optimization": {"stage": stage}})
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
        trainer.train()
        best = trainer.state.best_model_checkpoint
        saved = load_file(os.path.join(best, "model.safetensors"))
        engine = zt.session_of(trainer).engine
        with engine.gathered():
            current = {n: p.detach().clone() for n, p in model.named_parameters()}
        after = trainer.evaluate()["eval_loss"]  # the loaded weights are what the model now computes with
    finally:
        zt.deactivate()
    same = all(torch.equal(current[n], saved[n]) for n in saved if n in current)
    return os.path.basename(best), same, after, trainer.state.best_metric


@pytest.mark.parametrize("stage", [2, 3])
def test_load_best_model_at_end(tmp_path, stage):
    results = run_on_ranks(_best, 2, tmp_path / "a", stage, timeout=300)
    best, same, after, best_metric = results[0]
    assert best != "checkpoint-6"  # the best is an earlier checkpoint, so loading it changes the model
    assert same and results[1][1]
    assert abs(after - best_metric) <= 1e-5 * abs(best_metric)
