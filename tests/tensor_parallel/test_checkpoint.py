"""Checkpoints of dp 2 x tp 2 runs through the Trainer: a resume at the same (dp, tp) continues bit for
bit, one at (dp 4, tp 1) and back within 1e-5 of the uninterrupted losses; load_best_model_at_end."""

from __future__ import annotations

import pytest
from transformers import Trainer

import hf_zero.trainer as zt
from hf_zero.testing.multiprocess import RankFailure, run_on_ranks
from tests.tensor_parallel.models import tiny_llama
from tests.tensor_parallel.test_trainer import MAX_NORM, TOL, _rows
from tests.trainer.tiny import args, history


def _config(stage: int, tp: int) -> dict:
    # zero3_init_flag false: tp splits a whole model (the table refuses the flag's stage-3 default with tp)
    return {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0, "zero3_init_flag": False},
            "tensor_parallel": {"autotp_size": tp}}


def _train(rank, world, stage, tp, out, resume):
    zt.activate(_config(stage, tp))
    try:  # the same global batch of 4 rows at every (dp, tp): dp x per-device batch = 4
        trainer = Trainer(model=tiny_llama(), train_dataset=_rows(),
                          args=args(out, max_steps=4, save_strategy="steps", save_steps=2, max_grad_norm=MAX_NORM,
                                    per_device_train_batch_size=4 * tp // world, train_sampling_strategy="sequential",
                                    learning_rate=1e-3))
        trainer.train(resume_from_checkpoint=resume)
        return history(trainer)["loss"]
    finally:
        zt.deactivate()


def _continues(resumed: list[float], whole: list[float]) -> None:
    assert len(whole) == 4 and resumed[:2] == whole[:2]  # the first two come from the checkpoint's log
    assert all(abs(r - w) < TOL * abs(w) for r, w in zip(resumed[2:], whole[2:])), (resumed, whole)


def _wholes(rank, world, runs, out):
    """The uninterrupted run of every ``(stage, tp)`` of ``runs``, one after another in this one start."""
    return [_train(rank, world, stage, tp, f"{out}/stage{stage}_tp{tp}", None) for stage, tp in runs]


WHOLE_RUNS = ((2, 2), (3, 2), (1, 2), (1, 1), (3, 1))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted runs the resumes are held to, by (stage, tp), made in one 4-rank start for the
    module; their checkpoints (``out/stage{stage}_tp{tp}/checkpoint-2``) are only read."""
    out = str(tmp_path_factory.mktemp("whole"))
    losses = run_on_ranks(_wholes, 4, WHOLE_RUNS, out, timeout=600)[0]
    return out, dict(zip(WHOLE_RUNS, losses))


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_at_the_same_dp_and_tp(tmp_path, stage, whole):
    out, losses = whole
    resumed = run_on_ranks(_train, 4, stage, 2, str(tmp_path / "b"), f"{out}/stage{stage}_tp2/checkpoint-2",
                           timeout=300)[0]
    assert resumed == losses[stage, 2]  # bit for bit


@pytest.mark.parametrize("stage", [1, 3])
def test_resume_at_another_dp_and_tp(tmp_path, stage, whole):
    """(dp 2, tp 2) -> (dp 4, tp 1) and (dp 4, tp 1) -> (dp 2, tp 2): the stored tensors are whole
    ([Note: tensor-parallel parts]), so each run reads its own parts of them."""
    out, losses = whole
    _continues(run_on_ranks(_train, 4, stage, 1, str(tmp_path / "b"), f"{out}/stage{stage}_tp2/checkpoint-2",
                            timeout=300)[0], losses[stage, 2])
    _continues(run_on_ranks(_train, 4, stage, 2, str(tmp_path / "d"), f"{out}/stage{stage}_tp1/checkpoint-2",
                            timeout=300)[0], losses[stage, 1])


def _best(rank, world, out):
    import torch

    from hf_zero.tensor_parallel import gather_split
    from hf_zero.trainer import tensor_parallel as TP

    zt.activate(_config(2, 2))
    try:
        trainer = Trainer(model=tiny_llama(), train_dataset=_rows(), eval_dataset=_rows(8),
                          args=args(out, max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps",
                                    eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
                                    greater_is_better=False,  # step 2 evaluates lower here: not the last params
                                    per_device_train_batch_size=2, train_sampling_strategy="sequential",
                                    learning_rate=1e-2))
        trainer.train()
        state = TP.of(trainer)
        params = {}
        for name, p in trainer.model.named_parameters():
            dim = state.layout.split_dims.get(name)
            params[name] = (gather_split(p.detach(), dim, state.mesh.tp_group) if dim is not None else p.detach()).tolist()
        return trainer.state.best_model_checkpoint, params
    finally:
        zt.deactivate()


def test_load_best_model_at_end(tmp_path):
    """The best checkpoint's full weights load into every rank's part and its shards (the seam's gathered
    write-back over the dp group): the trained model ends as that checkpoint's weights."""
    import torch
    from transformers import AutoModelForCausalLM

    best, params = run_on_ranks(_best, 4, str(tmp_path), timeout=300)[0]
    assert best.endswith("checkpoint-2")
    saved = AutoModelForCausalLM.from_pretrained(best)
    worst = max((torch.tensor(params[n]) - p.detach()).abs().max().item() for n, p in saved.named_parameters())
    assert worst == 0.0, worst
