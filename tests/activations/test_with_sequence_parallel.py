"""Tiled compute and CPU checkpointing under Ulysses sequence parallelism (SP 2 on 2 gloo ranks, stage 2).

Each rank's slice of a sequence goes through the tiled MLP and the tiled loss (on the slice's
``shift_labels``, which sequence parallelism passes), and its checkpointed layers' inputs through the
host. Against the same SP run without them: losses and grad norms within the tiling's reassociation
(1e-5), for the Trainer's token-count normalization and for its per-batch mean (the path that asks
``compute_loss`` for outputs).
"""

from __future__ import annotations

import pytest

from hf_zero.testing.multiprocess import run_on_ranks
from tests.sequence_parallel.models import lm_batch, tiny_llama
from tests.trainer import tiny

STEPS = 3
LONG = {"activation_checkpointing": {"cpu_checkpointing": True}, "tiled_mlp": {"shards": 2},
        "tiled_loss": {"shards": 3}}


def _rows() -> list[dict]:
    rows = []
    for group in range(8):
        batch = lm_batch(group, step=7)
        rows += [{k: v[i] for k, v in batch.items()} for i in range(2)]
    return rows


def _train(out, blocks: dict, per_batch_mean: bool):
    from transformers import Trainer, TrainingArguments

    import hf_zero.trainer as zt
    from hf_zero.trainer import session as S

    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to="none", max_steps=STEPS, save_strategy="no", logging_steps=1,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="sgd", learning_rate=0.5,
        max_grad_norm=1.0, disable_tqdm=True, seed=0, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    zt.activate({"zero_optimization": {"stage": 2}, "sequence_parallel_size": 2, **blocks})
    try:
        trainer = Trainer(model=tiny_llama("sdpa"), args=args, train_dataset=_rows())
        if per_batch_mean:
            trainer.model_accepts_loss_kwargs = False
        trainer.train()
        activations = S.session_of(trainer).activations
    finally:
        zt.deactivate()
    calls = None if activations is None else (activations.tiled_loss.calls, activations.offload.counts.packed)
    return tiny.history(trainer), calls


def _both(rank, world, root, per_batch_mean):
    return (_train(root / f"plain{rank}", {}, per_batch_mean),
            _train(root / f"long{rank}", LONG, per_batch_mean))


@pytest.mark.parametrize("per_batch_mean", [False, True], ids=["token-count", "per-batch-mean"])
def test_tiled_and_offloaded_under_sequence_parallelism(tmp_path, per_batch_mean):
    for (plain, _), (long, calls) in run_on_ranks(_both, 2, tmp_path, per_batch_mean, timeout=300):
        tiny.same_training(long, plain, STEPS, "sp with tiling and cpu checkpointing")
        assert calls == (2 * STEPS, 2 * 2 * STEPS)  # every micro-step's loss tiled; 2 layers' inputs offloaded
