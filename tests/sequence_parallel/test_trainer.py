"""Sequence parallelism through the unmodified Trainer equals the plain Trainer on W / P ranks.

The SP run trains on W ranks with hf_zero (``sequence_parallel_size`` in the file, or the Trainer's
``parallelism_config.sp_size``); the reference is the plain Trainer (DDP) on W / P ranks with the
same data, seed and arguments. Every logged loss and grad norm, and the trained params, agree within
1e-5 (fp32), and so does the evaluation after training (unsplit batches, in eval mode). The rows carry a prompt (labels -100) and right padding, so the slices of a sequence
hold different numbers of real tokens. The optimizer is SGD, so the params after each step are
linear in the gradients (Adam's division by the root of its second moment would magnify the fp32
reassociation of tiny gradients past 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest

from hf_zero.testing.multiprocess import run_on_ranks
from tests.sequence_parallel.models import lm_batch, tiny_llama
from tests.trainer import tiny

STEPS = 3


def _rows() -> list[dict]:
    rows = []
    for group in range(8):
        batch = lm_batch(group, step=7)
        rows += [{k: v[i] for k, v in batch.items()} for i in range(2)]
    return rows


def _train(rank, world, out, sp, stage, how, average, per_batch_mean, checkpointing=False):
    import torch
    from accelerate import ParallelismConfig
    from transformers import Trainer, TrainingArguments

    import hf_zero.trainer as zt
    from hf_zero.trainer import session as S

    model = tiny_llama("sdpa")
    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to="none", max_steps=STEPS, save_strategy="no", logging_steps=1,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="sgd", learning_rate=0.5, max_grad_norm=1.0,
        disable_tqdm=True, seed=0, average_tokens_across_devices=average, gradient_checkpointing=checkpointing,
        parallelism_config=ParallelismConfig(sp_size=sp) if how == "parallelism_config" else None)
    if stage is not None:
        config = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                        "reduce_bucket_size": 5000}}
        if how == "file":
            config["sequence_parallel_size"] = sp
        if checkpointing:  # ZeRO-R beside SP: partitioned (each rank's checkpoints are its slice), on the host
            config["activation_checkpointing"] = {"partition_activations": True, "cpu_checkpointing": True}
            config["tiled_mlp"] = config["tiled_loss"] = {"shards": 2}  # ALST's tiled compute on each slice
        zt.activate(config)
    try:
        trainer = Trainer(model=model, args=args, train_dataset=_rows(), eval_dataset=_rows())
        if per_batch_mean:  # the Trainer's per-batch mean path (a model without loss kwargs)
            trainer.model_accepts_loss_kwargs = False
        trainer.train()
        evaluated = trainer.evaluate()["eval_loss"]  # eval batches are not split: the model attends unsplit
        session = S.session_of(trainer)
        if session is not None:
            assert session.config.sequence_parallel_size == sp
            assert args.parallelism_config is None  # taken over: the Trainer ran no DeepSpeed SP path
            assert (session.activations is not None) == checkpointing
        engine = session.engine if session is not None else None
        with engine.gathered() if engine is not None else torch.no_grad():
            params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    finally:
        zt.deactivate()
    return tiny.history(trainer), params, evaluated


def _check(sp_run, ref_run):
    (got, got_params, got_eval), (want, want_params, want_eval) = sp_run, ref_run
    tiny.same_training(got, want, STEPS, "sp")
    tiny.close(got_eval, want_eval, what="eval_loss")
    for name, value in want_params.items():
        err = np.linalg.norm(got_params[name] - value) / np.linalg.norm(value)
        assert err <= 1e-5, (name, err)


@pytest.mark.parametrize("stage,how,average,per_batch_mean,checkpointing", [
    (2, "file", True, False, False),  # the Trainer's default: tokens counted over every rank
    (3, "parallelism_config", False, False, False),  # each rank's count -> the group's
    (1, "file", True, True, False),  # a per-batch mean, combined over the group
    (3, "file", True, False, True),  # --gradient_checkpointing, CPU checkpointing, tiled compute: the recompute runs the all-to-alls again
])
def test_sp2_w2_equals_one_rank(tmp_path, stage, how, average, per_batch_mean, checkpointing):
    ref = run_on_ranks(_train, 1, tmp_path / "ref", 1, None, None, average, per_batch_mean, checkpointing,
                       timeout=300)[0]
    runs = run_on_ranks(_train, 2, tmp_path / "sp", 2, stage, how, average, per_batch_mean, checkpointing,
                        timeout=300)
    for run in runs:
        _check(run, ref)


def test_sp2_dp2_w4_equals_two_ranks(tmp_path):
    ref = run_on_ranks(_train, 2, tmp_path / "ref", 1, None, None, True, False, timeout=300)[0]
    runs = run_on_ranks(_train, 4, tmp_path / "sp", 2, 2, "file", True, False, timeout=300)
    for run in runs:
        _check(run, ref)
