"""DeepSpeed's five learning-rate schedules as torch LR schedulers, with DeepSpeed's formulas.

Ported from DeepSpeed 0.19.8 ``deepspeed/runtime/lr_schedules.py``, expression for expression
(the same float operations in the same order), including its quirks: a warmup of fewer than 2
steps runs as 2; OneCycle sets ``betas`` to ``(cycle_min_mom, 0.99)`` when built and to
``(momentum, 0.99)`` at every step, replacing the optimizer's beta2.
``tests/config/test_ds_lr_curves.py`` compares every step with curves produced by DeepSpeed's
own classes (``tests/config/data/ds_lr_curves/make_ds_lr_curves.py``). Params are checked when
the config file is read (``hf_zero/config/scheduler_block.py``); :func:`build_scheduler` takes
them as resolved.

[Note: iteration offset]
DeepSpeed counts ``last_batch_iteration`` from -1: building the scheduler applies the value at
-1, and each ``step()`` (after each optimizer step, skipped when fp16 overflows) moves one on.
torch's LRScheduler steps once while it is built (``last_epoch`` 0), so here DeepSpeed's
iteration is ``i = last_epoch - 1``. Optimizer step k (from 0) runs with DeepSpeed's value at
``i = k - 1`` under both. The Trainer logs the lr a step ran with; DeepSpeed's integration logs
the scheduler's value after the step, one iteration later.

``state_dict`` holds only numbers, strings and lists: the Trainer's checkpoint reads it back
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler


def _per_group(optimizer: torch.optim.Optimizer, value: Any, name: str) -> list:
    """DeepSpeed's ``_format_param``: one value for every param group, or a list of one per group."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(optimizer.param_groups):
            raise ValueError(f"scheduler.params.{name} has {len(value)} values but the optimizer has "
                             f"{len(optimizer.param_groups)} param groups; give one number or one per group")
        return list(value)
    return [value] * len(optimizer.param_groups)


def _warmup_ratio(i: int, warmup_type: str, warmup_num_steps: int) -> float:
    """DeepSpeed's warmup fraction at iteration ``i`` < ``warmup_num_steps`` (>= 2): log or linear."""
    if warmup_type == "log":
        return (1.0 / math.log(warmup_num_steps)) * math.log(i + 1)  # DeepSpeed's inverse_log_warm_up * log
    return i / warmup_num_steps


class _DeepSpeedSchedule(LRScheduler):
    """Sets each group's lr to ``lrs_at`` DeepSpeed's iteration ([Note: iteration offset]); each
    schedule below defines ``lrs_at(i) -> one lr per param group``."""

    def get_lr(self) -> list[float]:
        return list(self.lrs_at(self.last_epoch - 1))


class WarmupLR(_DeepSpeedSchedule):
    """From ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps`` (log or linear), then flat."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_min_lr: Any = 0.0, warmup_max_lr: Any = None,
                 warmup_num_steps: int = 1000, warmup_type: str = "log") -> None:
        if warmup_max_lr is None:
            warmup_max_lr = [group["lr"] for group in optimizer.param_groups]
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(optimizer, warmup_max_lr, "warmup_max_lr")
        self.delta_lrs = [big - small for big, small in zip(self.max_lrs, self.min_lrs)]
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = warmup_type
        super().__init__(optimizer)

    def lrs_at(self, i: int) -> list[float]:
        if i < 0:
            return self.min_lrs
        gamma = self._gamma(i)
        return [min_lr + (delta_lr * gamma) for min_lr, delta_lr in zip(self.min_lrs, self.delta_lrs)]

    def _warmup(self, i: int) -> float:
        return _warmup_ratio(i, self.warmup_type, self.warmup_num_steps)

    def _gamma(self, i: int) -> float:
        return self._warmup(i) if i < self.warmup_num_steps else 1.0


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at ``total_num_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int, warmup_min_lr: Any = 0.0,
                 warmup_max_lr: Any = 0.001, warmup_num_steps: int = 1000, warmup_type: str = "log") -> None:
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type)

    def _gamma(self, i: int) -> float:
        if i < self.warmup_num_steps:
            return self._warmup(i)
        return max(0.0, float(self.total_num_steps - i) / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_DeepSpeedSchedule):
    """Each group's own lr times a ratio: from ``warmup_min_ratio`` to 1 over the warmup, then a
    cosine down to ``cos_min_ratio`` at ``total_num_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = "log") -> None:
        self.total_num_steps = total_num_steps
        self.cos_min_ratio = cos_min_ratio
        self.warmup_type = warmup_type
        self.warmup_min_ratio = warmup_min_ratio
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.org_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        super().__init__(optimizer)

    def lrs_at(self, i: int) -> list[float]:
        if i < 0:
            return [0.0 for _ in self.org_lrs]
        ratio = self._ratio(i)
        return [org_lr * ratio for org_lr in self.org_lrs]

    def _ratio(self, i: int) -> float:
        if i < self.warmup_num_steps:
            ratio = _warmup_ratio(i, self.warmup_type, self.warmup_num_steps)
            return self.warmup_min_ratio + ratio * (1. - self.warmup_min_ratio)
        real_last_step = i - self.warmup_num_steps + 1
        real_total_steps = max(1, self.total_num_steps - self.warmup_num_steps)
        cosine_progress = min(1.0, real_last_step / real_total_steps)
        ratio = (1 + math.cos(math.pi * cosine_progress)) / 2
        return max(0.0, self.cos_min_ratio + (1. - self.cos_min_ratio) * ratio)


class LRRangeTest(_DeepSpeedSchedule):
    """``lr_range_test_min_lr * (1 + step_rate * interval)``, interval continuous or a staircase."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_range_test_min_lr: Any = 1e-3,
                 lr_range_test_step_size: int = 2000, lr_range_test_step_rate: float = 1.0,
                 lr_range_test_staircase: bool = False) -> None:
        self.min_lr = _per_group(optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = lr_range_test_step_size
        self.step_rate = lr_range_test_step_rate
        self.staircase = lr_range_test_staircase
        super().__init__(optimizer)

    def lrs_at(self, i: int) -> list[float]:
        if i < 0:
            return self.min_lr
        if self.staircase:
            interval = math.floor(float(i + 1) / self.step_size)
        else:
            interval = float(i + 1) / self.step_size
        increase = 1 + self.step_rate * interval
        return [min_lr * increase for min_lr in self.min_lr]


class OneCycle(_DeepSpeedSchedule):
    """One triangle from ``cycle_min_lr`` up to ``cycle_max_lr`` and back (momentum the other way),
    then an optional decay every ``decay_step_size`` steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, cycle_min_lr: Any, cycle_max_lr: Any,
                 decay_lr_rate: float = 0., cycle_first_step_size: float = 2000,
                 cycle_second_step_size: float | None = None, cycle_first_stair_count: int = 0,
                 cycle_second_stair_count: int | None = None, decay_step_size: float = 0,
                 cycle_momentum: bool = True, cycle_min_mom: Any = 0.8, cycle_max_mom: Any = 0.9,
                 decay_mom_rate: float = 0.) -> None:
        first = float(cycle_first_step_size)
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_step_size, self.second_step_size = first, second
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = cycle_first_stair_count if cycle_second_stair_count is None \
            else cycle_second_stair_count
        self.decay_step_size = decay_step_size
        self.min_lrs = _per_group(optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = _per_group(optimizer, cycle_max_lr, "cycle_max_lr")
        self.decay_lr_rate = decay_lr_rate
        self.skip_lr_decay = math.isclose(decay_step_size, 0) or math.isclose(decay_lr_rate, 0)
        # DeepSpeed cycles momentum only for optimizers with betas (it warns and stops otherwise).
        self.cycle_momentum = bool(cycle_momentum) and "betas" in optimizer.defaults
        self.decay_mom_rate = decay_mom_rate
        self.skip_mom_decay = math.isclose(decay_step_size, 0) or math.isclose(decay_mom_rate, 0)
        self.min_moms = [[mom, 0.99] for mom in _per_group(optimizer, cycle_min_mom, "cycle_min_mom")]
        self.max_moms = [[mom, 0.99] for mom in _per_group(optimizer, cycle_max_mom, "cycle_max_mom")]
        super().__init__(optimizer)

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if self.cycle_momentum:
            i = self.last_epoch - 1
            moms = self.min_moms if i < 0 else self.moms_at(i)  # DeepSpeed's constructor sets the minimum
            for group, (beta1, beta2) in zip(self.optimizer.param_groups, moms):
                group["betas"] = (beta1, beta2)

    def lrs_at(self, i: int) -> list[float]:
        if i < 0:
            return self.min_lrs
        if i < self.total_size:
            scale = self._scale_factor(i)
            return [lo + (hi - lo) * scale for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return self.min_lrs
        factor = 1 + self.decay_lr_rate * ((i - self.total_size + 1) / self.decay_step_size)
        return [lo / factor for lo in self.min_lrs]

    def moms_at(self, i: int) -> list[list[float]]:
        if i < self.total_size:
            scale = self._scale_factor(i)
            return [[hi[0] - (hi[0] - lo[0]) * scale, lo[1]] for lo, hi in zip(self.min_moms, self.max_moms)]
        if self.skip_mom_decay:
            return self.max_moms
        factor = 1 + self.decay_mom_rate * ((i - self.total_size + 1) / self.decay_step_size)
        return [[beta1 * factor, beta2] for beta1, beta2 in self.max_moms]

    def _scale_factor(self, i: int) -> float:
        batch_iteration = i + 1
        cycle = math.floor(1 + batch_iteration / self.total_size)
        x = 1. + batch_iteration / self.total_size - cycle
        if x <= self.step_ratio:
            scale_factor = x / self.step_ratio
            stair_count = self.first_stair_count
        else:
            scale_factor = (x - 1) / (self.step_ratio - 1)
            stair_count = self.second_stair_count
        if stair_count > 0:
            cycle_iteration = batch_iteration % self.total_size
            if cycle_iteration <= self.first_step_size:
                stair_position = cycle_iteration * stair_count / self.first_step_size
            else:
                stair_position = (self.total_size - cycle_iteration) * stair_count / self.second_step_size
            scale_factor = math.floor(stair_position) / stair_count
        return scale_factor


SCHEDULES: dict[str, type[_DeepSpeedSchedule]] = {
    cls.__name__: cls for cls in (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest)
}
"""scheduler.type -> its class (the names of ``hf_zero/config/scheduler_block.py``'s SCHEDULERS)."""


def build_scheduler(type_: str, optimizer: torch.optim.Optimizer, params: dict[str, Any]) -> LRScheduler:
    """The schedule ``type_`` on ``optimizer`` with resolved ``params`` (no "auto" left): one of DeepSpeed's
    five, or ``torch.optim.lr_scheduler.<Name>`` (what the plan's ``runs`` names), as DeepSpeed builds both."""
    prefix = "torch.optim.lr_scheduler."
    if type_.startswith(prefix):
        return getattr(torch.optim.lr_scheduler, type_.removeprefix(prefix))(optimizer, **params)
    return SCHEDULES[type_](optimizer, **params)
