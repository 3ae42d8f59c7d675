"""Trainer checkpoints under hf_zero resume the same run: on CPU fp32 at the same world size and
stage, the losses after resuming equal the uninterrupted run's bit for bit; at another world
size or stage they match within 1e-5. Checkpoints of another model, or with a missing or cut
file, are refused before training, naming the file and what is wrong."""

from __future__ import annotations

import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from hf_zero.testing.multiprocess import RankFailure, run_on_ranks
from tests.trainer import tiny


def _run(rank, world, out, stage, resume_from, ga=2, layers=2, save_steps=3, kill_rank_at=None, kill_in="optimizer",
         save_total_limit=None):
    import signal

    import hf_zero.trainer as zt

    class KilledMidSave(Trainer):
        """Rank 1 is killed (SIGKILL) while the checkpoint ``kill_rank_at`` is being written."""

        def _save_optimizer_and_scheduler(self, output_dir):
            if kill_in == "optimizer" and rank == 1 and output_dir.endswith(f"checkpoint-{kill_rank_at}"):
                os.makedirs(os.path.join(output_dir, "hf_zero_sharded"), exist_ok=True)
                with open(os.path.join(output_dir, "hf_zero_sharded", "__1_0.distcp"), "wb") as f:
                    f.write(b"half a shard")
                os.kill(os.getpid(), signal.SIGKILL)
            super()._save_optimizer_and_scheduler(output_dir)

        def _save_rng_state(self, output_dir):
            # after the sharded state is written: rank 0 goes on to the trainer state (and, with
            # save_total_limit, to deleting old checkpoints) while this rank dies
            if kill_in == "rng" and rank == 1 and output_dir.endswith(f"checkpoint-{kill_rank_at}"):
                os.kill(os.getpid(), signal.SIGKILL)
            super()._save_rng_state(output_dir)

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (48, 12), generator=g)]
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=6, save_steps=save_steps, save_total_limit=save_total_limit,
                             per_device_train_batch_size=2, gradient_accumulation_steps=ga, learning_rate=1e-2,
                             weight_decay=0.1, warmup_steps=2, logging_steps=1, disable_tqdm=True, seed=0)
    zt.activate({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}})
    try:
        trainer = (KilledMidSave if kill_rank_at else Trainer)(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume_from if resume_from in (None, True) else str(resume_from))
    finally:
        zt.deactivate()
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return losses if resume_from is not True else (losses, trainer.state.global_step)


def _each(rank, world, job, calls):
    """``job(rank, world, *args)`` for every ``args`` in ``calls``, one after another in one rank start."""
    return [job(rank, world, *args) for args in calls]


FULL_STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted runs the resumes are held to, made in one rank start for the module: at stages
    1-3 saving every 3 steps (``out/stage{N}``), and at stage 2 saving every 2 (``out/every2``). Returns
    ``out`` and rank 0's losses by run name. Tests only read these folders: one that changes a checkpoint
    copies it first."""
    out = tmp_path_factory.mktemp("full")
    calls = [(out / f"stage{stage}", stage, None) for stage in FULL_STAGES] + [(out / "every2", 2, None, 2, 2, 2)]
    losses = run_on_ranks(_each, 2, _run, calls, timeout=400)[0]
    return out, dict(zip([f"stage{stage}" for stage in FULL_STAGES] + ["every2"], losses))


@pytest.mark.parametrize("stage", FULL_STAGES)
def test_resume_is_bitwise_identical(tmp_path, stage, full):
    out, losses = full
    ckpt = out / f"stage{stage}" / "checkpoint-3"
    assert sorted(f for f in os.listdir(ckpt / "hf_zero_sharded") if f.endswith(".distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # every rank wrote its part
    resumed = run_on_ranks(_run, 2, tmp_path / "b", stage, ckpt, timeout=300)[0]
    assert {4, 5, 6} <= set(resumed)  # (steps 1-3 come back with the restored trainer state)
    assert [resumed[s] for s in (4, 5, 6)] == [losses[f"stage{stage}"][s] for s in (4, 5, 6)]


def _refused(rank, world, out, resumes):
    """Each ``(checkpoint, layers)`` of ``resumes`` resumed at stage 2 in this one start: what each raised
    (``type: message``), or ``None`` for one that trained."""
    raised = []
    for i, (ckpt, layers) in enumerate(resumes):
        try:
            _run(rank, world, out / str(i), 2, ckpt, 2, layers)
            raised.append(None)
        except Exception as error:  # noqa: BLE001 - the refusal is what is checked
            raised.append(f"{type(error).__name__}: {error}")
    return raised


def test_resume_refuses_another_model_or_a_missing_part(tmp_path, full):
    import shutil

    ckpt = full[0] / "stage2" / "checkpoint-3"
    before = sorted(p.name for p in (ckpt / "hf_zero_sharded").iterdir())
    missing, truncated = tmp_path / "missing", tmp_path / "truncated"
    shutil.copytree(ckpt, missing)
    (missing / "hf_zero_sharded" / "__1_0.distcp").unlink()
    shutil.copytree(ckpt, truncated)
    with open(truncated / "hf_zero_sharded" / "__1_0.distcp", "r+b") as f:
        f.truncate(100)
    # one start tries the three, every rank refusing each before training
    refused = run_on_ranks(_refused, 2, tmp_path, [(ckpt, 3), (missing, 2), (truncated, 2)], timeout=300)
    for rank, (model, cut, short) in enumerate(refused):
        assert model and re.search(r"hf_zero_meta.json belongs to another model: trainable params of this "
                                   r"model not in it \['model.layers.2", model), (rank, model)
        assert cut and re.search(r"__1_0.distcp is missing: the checkpoint is incomplete", cut), (rank, cut)
        assert short and re.search(r"__1_0.distcp is truncated: 100 bytes", short), (rank, short)
    assert sorted(p.name for p in (ckpt / "hf_zero_sharded").iterdir()) == before  # never touched


@pytest.mark.parametrize("kill_in", ["optimizer", "rng"])
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_in_use(tmp_path, kill_in, full):
    full = full[1]["stage2"]
    with pytest.raises(RankFailure):  # save_total_limit=1 must not delete checkpoint-3 before 6 is whole
        run_on_ranks(_run, 2, tmp_path / "b", 2, None, 2, 2, 3, 6, kill_in, 1, timeout=150)
    assert (tmp_path / "b" / "checkpoint-3" / "hf_zero_complete.json").exists()
    assert not (tmp_path / "b" / "checkpoint-6" / "hf_zero_complete.json").exists()  # cut short
    out = run_on_ranks(_run, 2, tmp_path / "b", 2, True, timeout=300)
    assert [step for _, step in out] == [6, 6]  # resumed from checkpoint-3, then saved checkpoint-6 anew
    resumed = out[0][0]
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]
    assert (tmp_path / "b" / "checkpoint-6" / "hf_zero_complete.json").exists()


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
    zt.activate({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}})
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


def _close(a, b, rtol=1e-5):
    return abs(a - b) <= rtol * abs(b)


def test_resume_at_another_world_size(tmp_path, full):
    """2 ranks -> 4 ranks -> 1 rank, the same global batch (8) and data order throughout."""
    out, losses = full
    at4 = run_on_ranks(_run, 4, tmp_path / "b", 2, out / "every2" / "checkpoint-2", 1, 2, 2, timeout=400)[0]
    at1 = run_on_ranks(_run, 1, tmp_path / "c", 2, tmp_path / "b" / "checkpoint-4", 4, 2, 2, timeout=300)[0]
    for step, got in [(3, at4), (4, at4), (5, at1), (6, at1)]:
        assert _close(got[step], losses["every2"][step]), (step, got[step], losses["every2"][step])


def test_resume_at_another_stage(tmp_path, full):
    """Stage 2 -> stage 3 -> stage 1 on 2 ranks."""
    out, losses = full
    s3 = run_on_ranks(_run, 2, tmp_path / "b", 3, out / "every2" / "checkpoint-2", 2, 2, 2, timeout=300)[0]
    s1 = run_on_ranks(_run, 2, tmp_path / "c", 1, tmp_path / "b" / "checkpoint-4", 2, 2, 2, timeout=300)[0]
    for step, got in [(3, s3), (4, s3), (5, s1), (6, s1)]:
        assert _close(got[step], losses["every2"][step]), (step, got[step], losses["every2"][step])


def _run_offload(rank, world, out, offload, resume_from):
    import hf_zero.trainer as zt

    model, data = tiny.offload_job()
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=6, save_steps=3,
                             per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                             weight_decay=0.1, max_grad_norm=0.5, logging_steps=1, disable_tqdm=True, seed=0)
    zero = {"stage": 2}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    zt.activate({"zero_optimization": zero})
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    finally:
        zt.deactivate()
    return {h["step"]: (h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h}


def test_optimizer_offload_through_the_trainer_and_its_checkpoints(tmp_path):
    """A DeepSpeed-style offload_optimizer block trains as without it, and resumes bit for bit
    from its own checkpoint and from one written without offload."""
    plain, off = run_on_ranks(_each, 2, _run_offload, [(tmp_path / "a", False, None), (tmp_path / "b", True, None)],
                              timeout=300)[0]
    # The Trainer's fused AdamW takes the clip coefficient on the host as grad_scale (grad / (1/c)
    # rather than grad * c): the last bit of a grad may differ from the run without offload.
    assert off.keys() == plain.keys()
    for step in plain:
        assert off[step] == pytest.approx(plain[step], rel=1e-6), step
    # both resumes in one fresh start: from its own checkpoint and from the one without offload
    resumed, crossed = run_on_ranks(_each, 2, _run_offload, [(tmp_path / "c", True, tmp_path / "b" / "checkpoint-3"),
                                                             (tmp_path / "d", True, tmp_path / "a" / "checkpoint-3")],
                                    timeout=300)[0]
    assert [resumed[s] for s in (4, 5, 6)] == [off[s] for s in (4, 5, 6)]  # its own checkpoint: bit for bit
    for step in (4, 5, 6):
        assert crossed[step] == pytest.approx(plain[step], rel=1e-6), step
