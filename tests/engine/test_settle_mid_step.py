"""Settling the host step in the middle of a step ([Note: settle mid-step] in
hf_zero/engine/offload/host_step.py): with CPU optimizer offload stepping in backward ([Note: step
in backward]), anything that calls ``ZeroEngine.settle()`` (``gathered()``, ``full_state_dict()``,
a user's ``on_pre_optimizer_step`` callback that reads the params) between ``backward()`` and
``optimizer.step()`` finds chunks already handed to the worker, some stepped speculatively, others
held for the norm. Such a call must change nothing: params and optimizer state after the step are
those of the same run without it, bit for bit.

Each run is 4 steps of 2 micro-steps (the first under ``no_sync``) with clip thresholds (``CLIPS``)
that never fire (``huge``: every step speculated, half the elements, the rest held for the norm;
speculation stands), that fire every other step (``alternating``: a step whose speculated chunks
are redone, then one whose chunks are all held, as the policy waits after a redo), or no clipping
at all (``none``: no speculation policy, the chunks stepped in backward are the step). The mid-step
call comes at one of ``WHERE``; ``baseline`` makes none. (A settle that ended the step there left
the optimizer step with no chunk handed over: "0 of N chunks were handed to the step worker".)
"""

from __future__ import annotations

import copy

import pytest
import torch

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.engine.offload.speculation import SpeculationPolicy
from hf_zero.testing.multiprocess import run_each, run_on_ranks
from tests.engine.models import add_frozen_and_unused, batch, tiny_llama
from tests.engine.test_speculation import _bits, _groups, _snapshot, let_the_worker_start

HUGE, TINY = 1e9, 1e-3
STEPS = 4
CLIPS = {"none": [None] * STEPS, "huge": [HUGE] * STEPS, "alternating": [TINY, HUGE] * (STEPS // 2)}
# where the mid-step call comes, and which call
WHERE = {
    "baseline": None,
    "gathered_after_backward": ("backward", "gathered"),
    "settle_after_backward": ("backward", "settle"),
    "gathered_after_clip": ("clip", "gathered"),
    "gathered_between_micro_steps": ("micro", "gathered"),
}


def _mid_step(engine, model, call: str) -> None:
    if call == "settle":
        engine.settle()
        return
    with torch.no_grad(), engine.gathered():
        sum(p.sum() for p in model.parameters())  # read every full param (stage 3: gathered)


def _train(rank: int, world: int, stage: int, mode: str, where: str) -> dict:
    torch.manual_seed(0)
    model = add_frozen_and_unused(tiny_llama(0, tied=True))
    opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=3000,
                        offload=OptimizerOffload("cpu", ratio=1.0, chunk_numel=2000))
    clipping = CLIPS[mode][0] is not None
    # budget 0.5: some chunks held in each step that speculates; max_backoff 1: after a redo one step waits
    policy = SpeculationPolicy(budget=0.5, max_backoff=1) if clipping else None
    engine.set_step_in_backward(True, overlap_forward=True, speculation=policy)
    assert len(engine._host_step.chunks) >= 2
    at, call = WHERE[where] or (None, None)
    wrapped = ZeroModule(model, engine)
    norms = []
    for step, threshold in enumerate(CLIPS[mode]):
        for micro in range(2):
            last = micro == 1
            with (wrapped.no_sync() if not last else torch.enable_grad()):
                loss = wrapped(**batch(rank, step, micro, model.config.vocab_size)).loss / 2
                loss.backward()
            if at == "micro" and not last:
                _mid_step(engine, model, call)
        let_the_worker_start(engine, every_chunk=True)  # (the mid-step call then meets speculated chunks)
        if at == "backward":
            _mid_step(engine, model, call)
        norm = engine.clip_grad_norm_(threshold) if threshold is not None else engine.grad_norm()
        norms.append(_bits(norm))
        if at == "clip":
            _mid_step(engine, model, call)
        engine.optimizer.step()
        wrapped.zero_grad()
    snap = _snapshot(model, engine)
    counts = (policy.speculated_steps, policy.redone_steps) if policy is not None else None
    engine.close()
    return {"snap": snap, "norms": norms, "counts": counts}


def _all_runs(rank: int, world: int, stage: int) -> dict:
    runs = {(mode, where): (stage, mode, where) for mode in CLIPS for where in WHERE}
    return run_each(rank, world, _train, runs)


@pytest.mark.parametrize("world,stage", [(1, 2), (1, 3), (2, 2), (2, 3)])
def test_a_mid_step_settle_changes_nothing(world, stage):
    for rank_runs in run_on_ranks(_all_runs, world, stage, timeout=900):
        for mode in CLIPS:
            base = rank_runs[(mode, "baseline")]
            if mode == "huge":
                assert base["counts"] == (STEPS, 0), base["counts"]  # every step speculated, none redone
            if mode == "alternating":
                assert base["counts"] == (STEPS // 2, STEPS // 2), base["counts"]  # every other step redone
            for where in WHERE:
                run = rank_runs[(mode, where)]
                differ = [name for name in base["snap"] if base["snap"][name] != run["snap"].get(name)]
                assert not differ, (mode, where, differ[:5])
                assert set(run["snap"]) == set(base["snap"]) and run["norms"] == base["norms"], (mode, where)
                assert run["counts"] == base["counts"], (mode, where)


def _refusals(rank: int, world: int) -> list[str]:
    """What cannot go on mid-step is refused, and the step is still whole after the refusals."""
    model = tiny_llama(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=3000,
                        offload=OptimizerOffload("cpu", ratio=1.0, chunk_numel=2000))
    engine.set_step_in_backward(True, overlap_forward=True, speculation=SpeculationPolicy())
    reference = copy.deepcopy(model)
    wrapped = ZeroModule(model, engine)
    wrapped(**batch(rank, 0, 0, model.config.vocab_size)).loss.backward()
    errors = []
    with pytest.raises(RuntimeError, match=r"gathered\(modifier_rank=...\) between backward and optimizer.step") as e:
        engine.gathered(modifier_rank=0)
    errors.append(str(e.value))
    with pytest.raises(RuntimeError, match=r"set_step_in_backward\(\) between backward and optimizer.step") as e:
        engine.set_step_in_backward(False)
    errors.append(str(e.value))
    engine.clip_grad_norm_(1.0)
    engine.optimizer.step()
    wrapped.zero_grad()
    with engine.gathered(modifier_rank=0):  # after the step: allowed again
        pass
    engine.set_step_in_backward(False)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))  # it stepped
    engine.close()
    return errors


def test_edits_and_a_new_setting_are_refused_mid_step():
    assert len(run_on_ranks(_refusals, 1, timeout=300)[0]) == 2
