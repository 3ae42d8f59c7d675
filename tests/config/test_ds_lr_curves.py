"""hf_zero's DeepSpeed schedules give DeepSpeed's learning rate (and OneCycle's betas) at every step.

The curves in data/ds_lr_curves/ds_lr_curves.json come from DeepSpeed 0.19.8's own
lr_schedules.py (data/ds_lr_curves/make_ds_lr_curves.py runs its classes as DeepSpeed's engine
does). Here the same optimizer and params go through hf_zero's classes, stepped the same way;
every value must agree to a relative 1e-6.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from hf_zero.config.scheduler_block import REQUIRED, SCHEDULERS
from hf_zero.config.schema import SchedulerSpec
from hf_zero.trainer.ds_schedulers import SCHEDULES, build_scheduler

FIXTURE = json.loads((Path(__file__).parent / "data" / "ds_lr_curves" / "ds_lr_curves.json").read_text())
CASES = FIXTURE["cases"]


def _optimizer(name: str, lrs: list[float]) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return getattr(torch.optim, name)(groups, lr=lrs[0])


def _same(got, want, what: str) -> None:
    if isinstance(want, list):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), (what, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{what}[{i}]")
        return
    assert math.isclose(got, want, rel_tol=1e-6, abs_tol=0.0), (what, got, want)


def _ids(case: dict) -> str:
    return case["type"] + "-" + "-".join(f"{k}={v}" for k, v in case["params"].items())


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_every_step_matches_deepspeed(case):
    SchedulerSpec(type=case["type"], params=case["params"])  # the params pass the config check too
    opt = _optimizer(case["optimizer"]["type"], case["optimizer"]["lrs"])
    scheduler = build_scheduler(case["type"], opt, case["params"])
    for step, want in enumerate(case["lr"]):
        _same([g["lr"] for g in opt.param_groups], want, f"lr at step {step}")
        if case["betas"] is not None and case["betas"][step] is not None:
            _same([list(g["betas"]) for g in opt.param_groups], case["betas"][step], f"betas at step {step}")
        opt.step()
        scheduler.step()


def test_the_curves_exercise_each_schedule():
    """Every type is covered, and the curves move (warmup, decay, cycle) rather than sit still."""
    assert {c["type"] for c in CASES} == set(SCHEDULES) == set(SCHEDULERS) == set(FIXTURE["defaults"])
    for case in CASES:
        values = {round(lr[0], 15) for lr in case["lr"]}
        assert len(values) >= 2, case["params"]
    assert len(CASES[0]["lr"]) == FIXTURE["steps"] >= 30


@pytest.mark.parametrize("type_", sorted(SCHEDULERS))
def test_defaults_are_deepspeeds(type_):
    ours = {k: ("REQUIRED" if v is REQUIRED else v) for k, v in SCHEDULERS[type_].items()}
    assert ours == FIXTURE["defaults"][type_]


def test_resumed_schedule_continues_the_curve():
    """A scheduler restored from its state_dict (read back weights-only, as the Trainer's resume
    does) continues on DeepSpeed's curve."""
    case = next(c for c in CASES if c["type"] == "OneCycle" and "decay_mom_rate" in c["params"])
    opt = _optimizer(case["optimizer"]["type"], case["optimizer"]["lrs"])
    scheduler = build_scheduler(case["type"], opt, case["params"])
    for _ in range(12):
        opt.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    fresh_opt = _optimizer(case["optimizer"]["type"], case["optimizer"]["lrs"])
    fresh = build_scheduler(case["type"], fresh_opt, case["params"])
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(12, len(case["lr"])):
        fresh_opt.step()
        fresh.step()
        if step + 1 < len(case["lr"]):
            _same([g["lr"] for g in fresh_opt.param_groups], case["lr"][step + 1], f"lr at step {step + 1}")
            _same([list(g["betas"]) for g in fresh_opt.param_groups], case["betas"][step + 1],
                  f"betas at step {step + 1}")
