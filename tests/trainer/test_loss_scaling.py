"""fp16 loss scaling follows DeepSpeed's DynamicLossScaler (hf_zero/trainer/loss_scaling.py): hysteresis,
min_loss_scale, loss_scale_window and initial_scale_power all applied, so a DeepSpeed fp16 block as
transformers publishes it (hysteresis 2) runs as under DeepSpeed and warns about nothing.

The reference below is DeepSpeed 0.19's ``DynamicLossScaler.update_scale`` with
``consecutive_hysteresis`` false, transcribed; its one difference (DeepSpeed raises when a step
overflows at the minimum scale) is kept out of the patterns and tested on its own.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from hf_zero.config import load_config
from hf_zero.testing.multiprocess import run_on_ranks
from hf_zero.trainer.loss_scaling import (
    HYSTERESIS_LEFT,
    DeepSpeedScaler,
    ShardedDeepSpeedScaler,
    sharded_grad_scaler,
)

TRANSFORMERS_FP16 = {  # transformers' tests/deepspeed/ds_config_zero2.json, its fp16 block
    "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "zero_optimization": {"stage": 2},
}


class Reference:
    """DeepSpeed's update_scale (runtime/fp16/loss_scaler.py), consecutive_hysteresis false."""

    def __init__(self, init_scale, scale_window, min_scale, delayed_shift):
        self.cur_scale, self.scale_window, self.min_scale = init_scale, scale_window, min_scale
        self.delayed_shift = self.cur_hysteresis = delayed_shift
        self.cur_iter, self.last_overflow_iter = 0, -1

    def update_scale(self, overflow):
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale:
                    raise AssertionError("DeepSpeed raises here; the patterns avoid it")
                self.cur_scale = max(self.cur_scale / 2, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= 2
        self.cur_iter += 1


def _step(scaler, param, optimizer, overflow: bool) -> None:
    scaler.scale(torch.ones(()))  # makes the scale tensor on its first call
    param.grad = torch.full_like(param, float("inf") if overflow else 1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()


def _scaler(cls=DeepSpeedScaler, *, init=2.0 ** 6, window=3, min_scale=4.0, hysteresis=2):
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scaler = cls(device="cpu", init_scale=init, growth_interval=window, hysteresis=hysteresis, min_scale=min_scale)
    return scaler, param, optimizer


# 1 = an overflowing step. Each pattern halves, holds, grows and reaches the floor at hysteresis 1-3
# without overflowing at the floor with nothing left to tolerate (where DeepSpeed raises).
PATTERNS = {
    "burst": [1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1],
    "spread": [0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0],
    "floor": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0],
}


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_scale_follows_deepspeed_at_every_step(name, hysteresis):
    scaler, param, optimizer = _scaler(hysteresis=hysteresis)
    reference = Reference(2.0 ** 6, 3, 4.0, hysteresis)
    for i, overflow in enumerate(PATTERNS[name]):
        if overflow and reference.cur_scale == reference.min_scale and reference.cur_hysteresis == 1:
            break  # DeepSpeed would stop the run here (test_overflow_at_the_floor)
        before = param.detach().clone()
        _step(scaler, param, optimizer, bool(overflow))
        reference.update_scale(bool(overflow))
        assert scaler.get_scale() == reference.cur_scale, (name, i, scaler.get_scale(), reference.cur_scale)
        skipped = torch.equal(param.detach(), before)
        assert skipped == bool(overflow), (name, i)  # every overflowing step is skipped, as DeepSpeed


def test_hysteresis_holds_the_scale_then_halves():
    scaler, param, optimizer = _scaler(init=64.0, window=100, min_scale=1.0, hysteresis=3)
    scales = []
    for overflow in (1, 1, 1, 1):
        _step(scaler, param, optimizer, bool(overflow))
        scales.append(scaler.get_scale())
    assert scales == [64.0, 64.0, 32.0, 16.0]  # two tolerated, then halved at each (no growth in between)


def test_min_loss_scale_floors_the_scale():
    scaler, param, optimizer = _scaler(init=8.0, window=100, min_scale=3.0, hysteresis=1)
    for _ in range(3):
        _step(scaler, param, optimizer, True)
    assert scaler.get_scale() == 3.0


def test_overflow_at_the_floor():
    """DeepSpeed stops the run ("Current loss scale already at minimum"); hf_zero skips and stays (documented)."""
    scaler, param, optimizer = _scaler(init=4.0, window=100, min_scale=4.0, hysteresis=1)
    _step(scaler, param, optimizer, True)
    assert scaler.get_scale() == 4.0


def test_resume_goes_on_as_uninterrupted():
    """The overflows still tolerated are saved with the scaler (the Trainer's scaler.pt)."""
    pattern = [1, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1]
    whole, param, optimizer = _scaler(hysteresis=3, window=4)
    scales = []
    for overflow in pattern:
        _step(whole, param, optimizer, bool(overflow))
        scales.append(whole.get_scale())
    first, param, optimizer = _scaler(hysteresis=3, window=4)
    for overflow in pattern[:3]:
        _step(first, param, optimizer, bool(overflow))
    state = first.state_dict()
    assert state[HYSTERESIS_LEFT] == 1  # two overflows since the start, none since a growth
    second, param, optimizer = _scaler(hysteresis=3, window=4)
    second.load_state_dict(state)
    resumed = []
    for overflow in pattern[3:]:
        _step(second, param, optimizer, bool(overflow))
        resumed.append(second.get_scale())
    assert resumed == scales[3:]


def test_torch_state_without_the_count_loads():
    scaler, _, _ = _scaler(hysteresis=2)
    torch_state = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=3).state_dict()
    scaler.load_state_dict(torch_state)
    assert scaler.get_scale() == 16.0 and scaler.state_dict()[HYSTERESIS_LEFT] == 2


def _sharded(rank, world_size):
    scaler, param, optimizer = _scaler(ShardedDeepSpeedScaler, hysteresis=2, window=100, min_scale=1.0)
    scales = []
    for _ in range(3):  # only rank 1 overflows; every rank must hold, then halve, together
        scaler.scale(torch.ones(()))
        param.grad = torch.full_like(param, float("inf") if rank == 1 else 1.0)
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


def test_ranks_agree_on_overflow_and_hold_together():
    assert run_on_ranks(_sharded, 2) == [[64.0, 32.0, 16.0]] * 2


def _sharded_fused(rank, world_size, kind, unscale, overflowing):
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = (torch.optim.AdamW([param], lr=1.0, fused=True) if kind == "adamw"
                 else torch.optim.SGD([param], lr=1.0, fused=True))
    scaler = ShardedDeepSpeedScaler(device="cpu", init_scale=64.0, growth_interval=100, hysteresis=1, min_scale=1.0)
    out = []
    for step in range(3):  # the overflowing ranks overflow at step 1: every rank skips it and halves
        scaler.scale(torch.ones(()))
        param.grad = torch.full_like(param, float("inf") if (step == 1 and rank in overflowing) else 1.0)
        before = param.detach().clone()
        if unscale:  # the Trainer unscales before it clips (max_grad_norm > 0); with 0 it does not
            scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        out.append((not torch.equal(before, param.detach()), scaler.get_scale()))
    return out


@pytest.mark.parametrize("overflowing", [(1,), (0, 1)], ids=["one-rank", "both-ranks"])
@pytest.mark.parametrize("unscale", [True, False], ids=["unscaled", "not-unscaled"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_fused_optimizers_step_and_skip_together(kind, unscale, overflowing):
    """[Note: fused steps under the sharded scaler]: torch's ShardedGradScaler alone fails the fused
    step (found_inf of shape (1,)), steps where two ranks overflowed (a flag of 2), or, without
    unscale_, lets each rank judge its own shard."""
    assert run_on_ranks(_sharded_fused, 2, kind, unscale, overflowing) == [[(True, 64.0), (False, 32.0), (True, 32.0)]] * 2


def _schedule_over_overflow(rank, world_size, unscale):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # the state AcceleratedOptimizer reads
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=1.0, fused=True)
    cls = ShardedDeepSpeedScaler if world_size > 1 else DeepSpeedScaler
    scaler = cls(device="cpu", init_scale=64.0, growth_interval=100, hysteresis=1, min_scale=1.0)
    wrapped = AcceleratedOptimizer(optimizer, device_placement=False, scaler=scaler)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    out = []
    for step in range(3):  # step 1 overflows on the last rank
        scaler.scale(torch.ones(()))
        param.grad = torch.full_like(param, float("inf") if (step == 1 and rank == world_size - 1) else 1.0)
        if unscale:
            scaler.unscale_(optimizer)
        wrapped.step()  # steps the scaler and updates it, as accelerate does under the Trainer
        if not wrapped.step_was_skipped:  # what the Trainer does
            schedule.step()
        optimizer.zero_grad()
        out.append((wrapped.step_was_skipped, optimizer.param_groups[0]["lr"], scaler.get_scale()))
    return out


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\(\)` has been overridden")
@pytest.mark.parametrize("unscale", [True, False], ids=["unscaled", "not-unscaled"])
@pytest.mark.parametrize("world", [1, 2])
def test_an_overflowed_fused_step_is_reported_skipped_and_the_schedule_waits(world, unscale):
    """[Note: fused steps under the sharded scaler]: accelerate calls a step skipped only when
    optimizer.step() was not called; torch's fused path always calls it, so the Trainer's LR
    schedule moved past every overflow. DeepSpeed's does not."""
    expected = [(False, 0.5, 64.0), (True, 0.5, 32.0), (False, 1 / 3, 32.0)]
    for out in run_on_ranks(_schedule_over_overflow, world, unscale):
        assert [(a, pytest.approx(b), c) for a, b, c in out] == expected


def test_transformers_fp16_block_is_applied_and_quiet(tmp_path):
    """Issue 17: transformers' fp16 block (hysteresis 2) warned on every fp16 run; now every key is applied."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(TRANSFORMERS_FP16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(str(path))
        scaler = sharded_grad_scaler(config.precision, torch.device("cpu"))
    assert [str(w.message) for w in caught] == []
    assert (scaler.get_scale(), scaler.get_growth_interval(), scaler.hysteresis, scaler.min_scale) == \
        (2.0 ** 16, 1000, 2, 1.0)


@pytest.mark.parametrize("kwargs", [{"hysteresis": 0}, {"hysteresis": True}, {"min_scale": 0.0}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        _scaler(**kwargs)
