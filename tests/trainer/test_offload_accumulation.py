"""Optimizer offload with gradient accumulation on one rank, through the Trainer.

accelerate does not call ``no_sync()`` when there is one process, so the engine learns which
micro-step ends an accumulation from the Trainer (``accelerator.sync_gradients``): grads go to
the host once per optimizer step, never a partial copy per micro-step (a 7B model's partial
copies filled a 125 GiB host). The host step runs during the last micro-step's backward
(host_step.py, [Note: step in backward]; with clipping speculatively, [Note: speculation]), at one
rank and two."""

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


def _plain_then_offload(rank, world, job, out, cases):
    """For every ``args`` of ``cases``: ``job`` without offload (``out/i/a``), then with it (``out/i/b``),
    one after another in this one rank start."""
    return [(job(rank, world, out / str(i) / "a", False, *args), job(rank, world, out / str(i) / "b", True, *args))
            for i, args in enumerate(cases)]


CASES = [(1, 0.5), (1, 0.0), (2, 0.0)]  # (world, clip)


@pytest.fixture(scope="module")
def accumulation(tmp_path_factory) -> dict[tuple[int, float], tuple]:
    """Rank 0's (plain, offload) ``_run`` per (world, clip) of ``CASES``, one rank start per world size."""
    out, runs = tmp_path_factory.mktemp("accumulation"), {}
    for world in sorted({w for w, _ in CASES}):
        clips = [clip for w, clip in CASES if w == world]
        pairs = run_on_ranks(_plain_then_offload, world, _run, out / f"w{world}", [(c,) for c in clips],
                             timeout=300)[0]
        runs.update({(world, clip): pair for clip, pair in zip(clips, pairs)})
    return runs


@pytest.mark.parametrize("world,clip", CASES)
def test_accumulation_downloads_once_per_step(world, clip, accumulation):
    (plain, _, _), (off, partial_copies, early) = accumulation[world, clip]
    assert partial_copies is False  # no bucket went down before its last micro-step
    assert early is True  # the Trainer lets the host step run in backward (speculatively when it clips)
    assert len(off) == len(plain) == 3
    for got, want in zip(off, plain):
        assert got == pytest.approx(want, rel=1e-6)


def _eval_and_save(rank, world, out, offload):
    """No clipping, so the host step runs on into the next forward (overlap_forward): evaluation
    after every step, a checkpoint every 2 steps and the final save must all see the new params."""
    import os

    import hf_zero.trainer as zt

    model, data = tiny.offload_job()
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=4, save_steps=2,
                             eval_strategy="steps", eval_steps=1, per_device_train_batch_size=2,
                             per_device_eval_batch_size=4, learning_rate=1e-2, max_grad_norm=0.0, logging_steps=1,
                             disable_tqdm=True, seed=0)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        # A slow host step, so that evaluation and saves start while the worker is still stepping.
        import time

        from hf_zero.engine.offload import host_step as H

        step_chunk = H.HostStep._step_chunk

        def slow(self, *a):
            time.sleep(0.05)
            step_chunk(self, *a)

        H.HostStep._step_chunk = slow
    zt.activate({"zero_optimization": zero})
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
        trainer.train()
        trainer.save_model(os.path.join(str(out), "final"))
    finally:
        zt.deactivate()
    files = {}
    if rank == 0:
        for name in ("checkpoint-2/model.safetensors", "final/model.safetensors"):
            with open(os.path.join(str(out), name), "rb") as f:
                files[name] = f.read()
    return [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h], files


def test_eval_and_saves_see_the_overlapped_step(tmp_path):
    # one start, the plain run first: the offload run slows the host step for the rest of its process
    [(plain, off)] = run_on_ranks(_plain_then_offload, 2, _eval_and_save, tmp_path, [()], timeout=300)[0]
    assert len(off[0]) == 4 and off[0] == plain[0]  # eval loss after every step, bit for bit
    assert off[1] == plain[1]  # the checkpoint's and the final save's weights
