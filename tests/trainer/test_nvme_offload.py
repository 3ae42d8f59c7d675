"""Optimizer offload to NVMe through the Trainer: a DeepSpeed-style ``offload_optimizer`` block
with ``device: "nvme"`` trains as CPU offload does, and resumes bit for bit from its checkpoint, also
with part of the state in host memory (``host_share``, [Note: host share]) and with bf16 state
(``state_dtype``, [Note: bf16 swap files])."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer import tiny


def _run(rank, world, out, offload, resume_from, host_share=None, state_dtype=None):
    import hf_zero.trainer as zt
    from hf_zero.trainer import session as S

    model, data = tiny.offload_job()
    args = TrainingArguments(output_dir=str(out / "run"), use_cpu=True, report_to="none", max_steps=6, save_steps=3,
                             per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                             weight_decay=0.1, max_grad_norm=0.5, logging_steps=1, disable_tqdm=True, seed=0)
    # buffer_size: chunks of >= 2000 elements, several per step; 3 buffers of them in host memory
    block = {"device": offload, "buffer_count": 3, "buffer_size": 2000}
    if offload == "nvme":
        block["nvme_path"] = str(out)
    if host_share is not None:
        block["host_share"] = host_share
    config = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000, "offload_optimizer": block}}
    if state_dtype == "bf16":  # DeepSpeed's switch for it (offload_optimizer.state_dtype in hf_zero's own config)
        config["bf16"] = {"bf16_optimizer_states": True}
    zt.activate(config)
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
        engine = S.session_of(trainer).engine
        files = None
        if host_share is not None:  # the first chunks in host memory, the rest in the files
            assert type(engine._host_step.tier).__name__ == "SplitTier" and engine._host_step.tier.count > 0
        if state_dtype == "bf16":  # the moments are bf16 where they live between steps
            state = next(v for v in trainer.optimizer.state.values() if "exp_avg" in v)
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        if host_share is None and offload == "nvme":  # the engine is still the Trainer's: its files are there until exit
            tier = engine._host_step.tier
            assert len(tier.chunks) > 3
            files = sorted(p.name for p in Path(tier.dir.path).iterdir())
    finally:
        zt.deactivate()
    return {h["step"]: (h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h}, files


def _runs(rank, world, tmp_path):
    """Four Trainer runs in one process (spawning one costs more than a run)."""
    (tmp_path / "nvme").mkdir()
    cpu, _ = _run(rank, world, tmp_path / "cpu", "cpu", None)
    nvme, files = _run(rank, world, tmp_path / "nvme", "nvme", None)
    checkpoint = tmp_path / "nvme" / "run" / "checkpoint-3"
    resumed, _ = _run(rank, world, tmp_path / "nvme", "nvme", checkpoint)
    split, _ = _run(rank, world, tmp_path / "nvme", "nvme", checkpoint, host_share=0.5)
    return cpu, nvme, files, resumed, split


def test_nvme_offload_through_the_trainer_and_its_checkpoints(tmp_path):
    cpu, nvme, files, resumed, split = run_on_ranks(_runs, 1, tmp_path, timeout=300)[0]
    assert files == ["master.swap", "state.exp_avg.swap", "state.exp_avg_sq.swap"]
    assert nvme == cpu and len(nvme) == 6  # the same arithmetic, wherever the state lives
    assert [resumed[s] for s in (4, 5, 6)] == [nvme[s] for s in (4, 5, 6)]
    assert [split[s] for s in (4, 5, 6)] == [nvme[s] for s in (4, 5, 6)]  # resumed with half in host memory
    # every rank process has exited: no swap directory is left
    assert [p for p in os.listdir(tmp_path / "nvme") if p.startswith("hf_zero-swap")] == []


def _bf16_runs(rank, world, tmp_path):
    (tmp_path / "nvme").mkdir()
    cpu, _ = _run(rank, world, tmp_path / "cpu", "cpu", None, state_dtype="bf16")
    nvme, files = _run(rank, world, tmp_path / "nvme", "nvme", None, state_dtype="bf16")
    checkpoint = tmp_path / "nvme" / "run" / "checkpoint-3"
    resumed, _ = _run(rank, world, tmp_path / "nvme", "nvme", checkpoint, state_dtype="bf16")
    fp32, _ = _run(rank, world, tmp_path / "fp32", "cpu", None)
    return cpu, nvme, files, resumed, fp32


def test_bf16_state_on_nvme_through_the_trainer(tmp_path):
    """``offload_optimizer.state_dtype: "bf16"`` with ``device: "nvme"``: the same losses and norms as
    with bf16 state in host memory (the same rounding), a resume from its checkpoint bit for bit, and
    not fp32 state's numbers (the rounding does change them)."""
    cpu, nvme, files, resumed, fp32 = run_on_ranks(_bf16_runs, 1, tmp_path, timeout=300)[0]
    assert files == ["master.swap", "state.exp_avg.swap", "state.exp_avg_sq.swap"]
    assert nvme == cpu and len(nvme) == 6
    assert [resumed[s] for s in (4, 5, 6)] == [nvme[s] for s in (4, 5, 6)]
    assert nvme[6] != fp32[6]
