"""Speculation then validation through the Trainer ([Note: speculation] in
hf_zero/engine/offload/speculation.py): with ``max_grad_norm`` > 0 and CPU optimizer offload the
Trainer lets the host step run during backward and redo it when clipping fires. With gradient
accumulation, an evaluation and a checkpoint in between and a resume from it, the losses, grad
norms, eval losses, params and optimizer state are those of the waiting path (the host step
after the norm) bit for bit, and the run report counts the redone steps. At stages 1-3, one rank
and two (one rank start per world size, every job of that size in it).

The cases (``CASES``), each with speculation on and with the waiting path:

- ``clip``: threshold ``CLIP`` inside the job's range of norms: some steps clip (redone), some not
  (their speculative steps stand).
- ``nan`` / ``inf``: threshold ``HIGH``, above every real norm (no step clips), and at the 4th
  optimizer step (``INJECT_AT``: after checkpoint-2 and the eval at 2, so the resumed run goes
  through it too) the loss of both micro-steps is multiplied by a factor (``FACTORS``) so that the
  global grad norm is not finite: NaN (as a bf16 overflow gives), or inf with every grad finite
  (a factor of 1e30: grads near 1e30, whose squares overflow fp32; a factor of inf would give NaN
  grads, inf * 0 and inf - inf, so a NaN norm again).

What the waiting path does with a norm that is not finite (fp32, no loss scaler: bf16 and fp16
are not on the CPU Trainer path, and accelerate scales no fp16 loss on CPU, so the fp16 overflow
skip is not reached here; tests/engine/test_speculation.py forces it), which is also what the
plain Trainer does (torch's ``clip_grad_norm_``, then ``optimizer.step()`` with no check):

- the step is taken, not skipped: every AdamW step count ends at ``MAX_STEPS``;
- NaN norm: the clip coefficient ``max_norm / (norm + 1e-6)`` is NaN, every grad becomes NaN and
  so does every param (and every later norm, eval loss and param);
- inf norm: the coefficient is 0, every (finite) grad becomes 0 and AdamW steps with zero grads
  (its moments decay and the params move by momentum and weight decay): params stay finite and
  training goes on.

Speculation must give those bit for bit: the injected step is speculated (the steps before it
stood) and redone from its copies (for NaN the later steps clip too, but the policy's backoff
keeps them waiting), so the run report's ``host_steps_redone`` is 1 for the full run and for the
resumed one. The plain Trainer (``stage`` None) runs the same nan and inf jobs in the same start:
its norms, step counts and NaN pattern are checked to be hf_zero's, and for inf its params and
later losses to be close to hf_zero's (not bit for bit: hf_zero's fused AdamW divides by
``1 / coef`` where torch's clip multiplies by ``coef``).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_zero.testing.multiprocess import run_on_ranks, run_report
from tests.engine.test_speculation import let_the_worker_start
from tests.trainer import tiny

# by world size: the tiny job's grad norms straddle it (one rank: 1.2-1.8, two: 0.96-1.12), so some
# steps clip and some do not
CLIP = {1: 1.5, 2: 1.0}
HIGH = 100.0  # above every real norm of the job: only a norm that is not finite clips
MAX_STEPS = 5
INJECT_AT = 3  # global_step during the 4th optimizer step
FACTORS = {"nan": float("nan"), "inf": 1e30}
CASES = ("clip", *FACTORS)
STAGES = (1, 2, 3)
WORLDS = (1, 2)


def _bits(t: torch.Tensor) -> list:
    return t.detach().float().reshape(-1).view(torch.int32).tolist()


def _floats(bits: list) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


def _job(rank, world, out, stage, speculate, case):
    """One job: a full run and one resumed from its checkpoint-2 (the plain Trainer, ``stage`` None:
    the full run only)."""
    import hf_zero.trainer as zt
    from hf_zero.engine import ZeroEngine
    from hf_zero.trainer import session as S

    if stage is not None and not speculate:  # the waiting path: the host step after the norm, as before speculation
        set_step_in_backward = ZeroEngine.set_step_in_backward
        ZeroEngine.set_step_in_backward = lambda self, enabled, **kw: set_step_in_backward(self, False)
    factor = FACTORS.get(case)

    class WorkerFirst(Trainer):
        """Lets the worker start every chunk queued before the norm is taken, so that the steps
        that speculate are the policy's choice, not the timing's; multiplies the loss at
        ``INJECT_AT`` by ``factor``."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss * factor if factor is not None and self.state.global_step == INJECT_AT else loss

        def _clip_grad_norm(self, model):
            if S.session_of(self) is not None:
                let_the_worker_start(S.session_of(self).engine, every_chunk=True)
            return super()._clip_grad_norm(model)

    runs = {}
    resumes = (("full", None),) if stage is None else (("full", None),
                                                       ("resumed", os.path.join(out, "full", "checkpoint-2")))
    for name, resume in resumes:
        model, data = tiny.offload_job()
        args = TrainingArguments(output_dir=os.path.join(out, name), use_cpu=True, report_to="none",
                                 max_steps=MAX_STEPS, save_steps=2, eval_strategy="steps", eval_steps=2,
                                 per_device_train_batch_size=2, per_device_eval_batch_size=4,
                                 gradient_accumulation_steps=2, learning_rate=1e-2,
                                 max_grad_norm=CLIP[world] if case == "clip" else HIGH,
                                 logging_steps=1, disable_tqdm=True, seed=0)
        if stage is not None:
            zt.activate({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                               "offload_optimizer": {"device": "cpu"}}})
        try:
            trainer = WorkerFirst(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
            trainer.train(resume_from_checkpoint=resume)
            if stage is None:
                params = {n: _bits(p) for n, p in model.named_parameters()}
                optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
                states = [optimizer.state.get(p, {}) for g in optimizer.param_groups for p in g["params"]]
                policy = None
            else:
                engine = S.session_of(trainer).engine
                with engine.gathered():
                    params = {n: _bits(p) for n, p in model.named_parameters()}
                states = [engine.optimizer.state.get(p, {}) for g in engine.optimizer.param_groups for p in g["params"]]
                policy = engine.speculation
            state = [{k: _bits(v) for k, v in sorted(s.items())} for s in states]
            step_counts = sorted({float(s["step"]) for s in states if "step" in s})
        finally:
            zt.deactivate()
        report = run_report(os.path.join(out, name)) if stage is not None else None
        history = trainer.state.log_history
        runs[name] = {
            # repr: exact for finite floats, and equal for NaN (NaN != NaN)
            "train": [(h["step"], repr(h["loss"]), repr(h["grad_norm"])) for h in history if "loss" in h],
            "eval": [(h["step"], repr(h["eval_loss"])) for h in history if "eval_loss" in h],
            "params": params, "state": state, "step_counts": step_counts,
            "counts": None if policy is None else (policy.speculated_steps, policy.redone_steps, policy.clipped_steps),
            "reported": None if report is None else report["ranks"][rank]["host_steps_redone"],
        }
    return runs


def _all_jobs(rank, world, out):
    """``_job`` for every case and stage speculating, then the plain Trainer's nan and inf jobs,
    then every hf_zero job waiting (which leaves the waiting path set for the rest of its process),
    in this one rank start; by (case, stage, speculate)."""
    keys = ([(case, stage, True) for case in CASES for stage in STAGES]
            + [(case, None, False) for case in FACTORS]
            + [(case, stage, False) for case in CASES for stage in STAGES])
    return {(case, stage, speculate): _job(rank, world, os.path.join(out, f"{case}-{stage}-{speculate}"),
                                           stage, speculate, case) for case, stage, speculate in keys}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """By world size: every rank's ``_job`` results by (case, stage, speculate), from one start per
    world size (made the first time a test asks for it; a start that failed fails every test of its
    world size without starting again)."""
    made = {}

    def of(world: int) -> dict:
        if world not in made:
            try:
                ranks = run_on_ranks(_all_jobs, world, str(tmp_path_factory.mktemp(f"jobs{world}")), timeout=900)
                made[world] = {key: [r[key] for r in ranks] for key in ranks[0]}
            except Exception as e:
                made[world] = e
        if isinstance(made[world], Exception):
            raise made[world]
        return made[world]

    return of


def _check_matches_waiting(waiting, speculating):
    """Speculation gives the waiting path's logs, params and optimizer state bit for bit, and a
    resume from checkpoint-2 gives the full run's."""
    for rank, (w, s) in enumerate(zip(waiting, speculating)):
        for name in ("full", "resumed"):
            assert w[name]["counts"] is None and w[name]["reported"] is None  # no speculation there
            for key in ("train", "eval", "params", "state"):
                assert s[name][key] == w[name][key], (rank, name, key)
        full, resumed = s["full"], s["resumed"]
        assert [e for e in resumed["eval"] if e[0] > 2] == [e for e in full["eval"] if e[0] > 2]
        assert resumed["params"] == full["params"] and resumed["state"] == full["state"]  # resume is exact too
        assert full["reported"] == full["counts"][1] and resumed["reported"] == resumed["counts"][1]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
def test_trainer_speculation_matches_the_waiting_path(world, stage, jobs):
    runs = jobs(world)
    waiting, speculating = runs["clip", stage, False], runs["clip", stage, True]
    _check_matches_waiting(waiting, speculating)
    for s in speculating:
        speculated, redone, _ = s["full"]["counts"]
        assert speculated > redone >= 1, s["full"]["counts"]  # steps that stood and steps redone
        norms = [float(n) for _, _, n in s["full"]["train"]]
        assert min(norms) < CLIP[world] < max(norms)  # the job clips at some steps, not at all


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", tuple(FACTORS))
def test_trainer_speculation_with_a_norm_not_finite(case, stage, world, jobs):
    runs = jobs(world)
    waiting, speculating, plain = runs[case, stage, False], runs[case, stage, True], runs[case, None, False]
    _check_matches_waiting(waiting, speculating)
    for s, p in zip(speculating, plain):
        full, resumed = s["full"], s["resumed"]
        norms = [float(n) for _, _, n in full["train"]]
        assert [step for step, _, _ in full["train"]] == list(range(1, MAX_STEPS + 1))
        assert all(n < HIGH for n in norms[:INJECT_AT])  # no real norm clips
        assert math.isnan(norms[INJECT_AT]) if case == "nan" else norms[INJECT_AT] == float("inf")
        # The injected step was speculated (steps 1-4 all were) and is the one redone; the NaN run's
        # step 5 (NaN too) clips without speculating (the policy's backoff).
        clipped = 2 if case == "nan" else 1
        assert full["counts"] == (INJECT_AT + 1, 1, clipped), full["counts"]
        assert resumed["counts"] == (INJECT_AT + 1 - 2, 1, clipped), resumed["counts"]  # steps 3 and 4
        assert full["reported"] == resumed["reported"] == 1
        # The waiting path's semantics, which are the plain Trainer's: the step is taken ...
        assert full["step_counts"] == p["full"]["step_counts"] == [float(MAX_STEPS)]
        assert [n for _, _, n in full["train"]][INJECT_AT] == [n for _, _, n in p["full"]["train"]][INJECT_AT]
        params = {n: _floats(b) for n, b in full["params"].items()}
        plain_params = {n: _floats(b) for n, b in p["full"]["params"].items()}
        if case == "nan":  # ... with NaN grads: every param NaN, as every later norm and eval loss
            assert all(t.isnan().all() for t in params.values()) and all(t.isnan().all() for t in plain_params.values())
            assert all(math.isnan(n) for n in norms[INJECT_AT:])
            assert math.isnan(float(full["eval"][-1][1]))
        else:  # ... with zero grads: params finite, training goes on as the plain Trainer's
            assert all(t.isfinite().all() for t in params.values())
            assert math.isfinite(norms[-1]) and math.isfinite(float(full["eval"][-1][1]))
            for n, t in params.items():
                torch.testing.assert_close(t, plain_params[n], rtol=1e-4, atol=1e-5, msg=n)
            plain_losses = [float(loss) for _, loss, _ in p["full"]["train"]]
            losses = [float(loss) for _, loss, _ in full["train"]]
            assert losses == pytest.approx(plain_losses, rel=1e-4)
