"""Speculation then validation through the Trainer ([Note: speculation] in
hf_zero/engine/offload/speculation.py): with ``max_grad_norm`` > 0 and CPU optimizer offload the
Trainer lets the host step run during backward and redo it when clipping fires. With gradient
accumulation, an evaluation and a checkpoint in between and a resume from it, the losses, grad
norms, eval losses, params and optimizer state are those of the waiting path (the host step
after the norm) bit for bit, and the run report counts the redone steps."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_zero.testing.multiprocess import run_on_ranks, run_report
from tests.engine.test_speculation import let_the_worker_start
from tests.trainer import tiny

CLIP = 1.0  # the tiny job's grad norms are 0.96-1.12: some steps clip, some do not


def _bits(t: torch.Tensor) -> list:
    return t.detach().float().reshape(-1).view(torch.int32).tolist()


def _job(rank, world, out, stage, speculate):
    import hf_zero.trainer as zt
    from hf_zero.engine import ZeroEngine
    from hf_zero.trainer import session as S

    if not speculate:  # the waiting path: the host step after the norm, as before speculation
        set_step_in_backward = ZeroEngine.set_step_in_backward
        ZeroEngine.set_step_in_backward = lambda self, enabled, **kw: set_step_in_backward(self, False)

    class WorkerFirst(Trainer):
        """Lets the worker start every chunk queued before the norm is taken, so that the steps
        that speculate are the policy's choice, not the timing's."""

        def _clip_grad_norm(self, model):
            let_the_worker_start(S.session_of(self).engine, every_chunk=True)
            return super()._clip_grad_norm(model)

    runs = {}
    for name, resume in (("full", None), ("resumed", os.path.join(out, "full", "checkpoint-2"))):
        model, data = tiny.offload_job()
        args = TrainingArguments(output_dir=os.path.join(out, name), use_cpu=True, report_to="none", max_steps=5,
                                 save_steps=2, eval_strategy="steps", eval_steps=2, per_device_train_batch_size=2,
                                 per_device_eval_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2,
                                 max_grad_norm=CLIP, logging_steps=1, disable_tqdm=True, seed=0)
        zt.activate({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                           "offload_optimizer": {"device": "cpu"}}})
        try:
            trainer = WorkerFirst(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
            trainer.train(resume_from_checkpoint=resume)
            engine = S.session_of(trainer).engine
            with engine.gathered():
                params = {n: _bits(p) for n, p in model.named_parameters()}
            pieces = [p for g in engine.optimizer.param_groups for p in g["params"]]
            state = [{k: _bits(v) for k, v in sorted(engine.optimizer.state.get(p, {}).items())} for p in pieces]
            policy = engine.speculation
        finally:
            zt.deactivate()
        report = run_report(os.path.join(out, name))
        history = trainer.state.log_history
        runs[name] = {
            "train": [(h["step"], h["loss"], h["grad_norm"]) for h in history if "loss" in h],
            "eval": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h],
            "params": params, "state": state,
            "counts": None if policy is None else (policy.speculated_steps, policy.redone_steps),
            "reported": report["ranks"][rank]["host_steps_redone"],
        }
    return runs


STAGES = (2, 3)


def _all_jobs(rank, world, out):
    """``_job`` for every stage speculating, then for every stage waiting (which leaves the waiting path
    set for the rest of its process), in this one rank start."""
    return {(stage, speculate): _job(rank, world, os.path.join(out, f"{'spec' if speculate else 'wait'}{stage}"),
                                     stage, speculate) for speculate in (True, False) for stage in STAGES}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[tuple[int, bool], list[dict]]:
    """Every rank's ``_job`` results by (stage, speculate), from one start."""
    ranks = run_on_ranks(_all_jobs, 2, str(tmp_path_factory.mktemp("jobs")), timeout=600)
    return {key: [r[key] for r in ranks] for key in ranks[0]}


@pytest.mark.parametrize("stage", STAGES)
def test_trainer_speculation_matches_the_waiting_path(stage, jobs):
    waiting, speculating = jobs[stage, False], jobs[stage, True]
    for rank, (w, s) in enumerate(zip(waiting, speculating)):
        for name in ("full", "resumed"):
            assert w[name]["counts"] is None and w[name]["reported"] is None  # no speculation there
            for key in ("train", "eval", "params", "state"):
                assert s[name][key] == w[name][key], (rank, name, key)
        full, resumed = s["full"], s["resumed"]
        assert [e for e in resumed["eval"] if e[0] > 2] == [e for e in full["eval"] if e[0] > 2]
        assert resumed["params"] == full["params"] and resumed["state"] == full["state"]  # resume is exact too
        speculated, redone = full["counts"]
        assert speculated > redone >= 1, full["counts"]  # steps that stood and steps redone
        assert full["reported"] == redone and resumed["reported"] == resumed["counts"][1]
        norms = [n for _, _, n in full["train"]]
        assert min(norms) < CLIP < max(norms)  # the job clips at some steps, not at all
