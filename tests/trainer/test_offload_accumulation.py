"""Optimizer offload with gradient accumulation on one rank, through the Trainer.

accelerate does not call ``no_sync()`` when there is one process, so the engine learns which
micro-step ends an accumulation from the Trainer (``accelerator.sync_gradients``): grads go to
the host once per optimizer step, never a partial copy per micro-step (a 7B model's partial
copies filled a 125 GiB host). Without clipping (``max_grad_norm`` 0) the host step runs during
the last micro-step's backward (host_step.py, [Note: step in backward]), at one rank and two."""

from __future__ import annotations

import pytest
from transformers import Trainer, TrainingArguments

from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer import tiny


def _run(rank, world, out, offload, clip=0.5):
    import hf_zero.trainer as zt
    from hf_zero.trainer import session as S

    model, data = tiny.offload_job()
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=3, save_strategy="no",
                             per_device_train_batch_size=2, gradient_accumulation_steps=4, learning_rate=1e-2,
                             max_grad_norm=clip, logging_steps=1, disable_tqdm=True, seed=0)
    zero = {"stage": 2, "reduce_bucket_size": 2000}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    zt.activate({"zero_optimization": zero})
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        engine = S.session_of(trainer).engine
        partial_copies = engine._host_step.accumulating if offload else None
        early = engine._host_step.early if offload else None
    finally:
        zt.deactivate()
    return [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h], partial_copies, early


@pytest.mark.parametrize("world,clip", [(1, 0.5), (1, 0.0), (2, 0.0)])
def test_accumulation_downloads_once_per_step(tmp_path, world, clip):
    plain, _, _ = run_on_ranks(_run, world, tmp_path / "a", False, clip, timeout=300)[0]
    off, partial_copies, early = run_on_ranks(_run, world, tmp_path / "b", True, clip, timeout=300)[0]
    assert partial_copies is False  # no bucket went down before its last micro-step
    assert early is (clip == 0.0)  # the Trainer lets the host step run in backward when it never clips
    assert len(off) == len(plain) == 3
    for got, want in zip(off, plain):
        assert got == pytest.approx(want, rel=1e-6)
