"""fp16 dynamic loss scaling as DeepSpeed does it, on torch's ``GradScaler`` / ``ShardedGradScaler``.

Each rank holds only its gradient shard, so whether any gradient overflowed must be agreed on by
all ranks: ``ShardedGradScaler`` all-reduces the found-inf flag, then every rank skips the step
together, as the Trainer and DeepSpeed do. The engine drops the skipped step's gradients when the
Trainer calls ``model.zero_grad()``. The scaler is hf_zero's at every stage (stage 0 too), so the
file's ``fp16`` keys mean what they mean under DeepSpeed wherever the Trainer scales losses.

[Note: DeepSpeed's dynamic loss scale]
DeepSpeed's ``DynamicLossScaler.update_scale`` (runtime/fp16/loss_scaler.py), with
``consecutive_hysteresis`` false (hf_zero's only mode: config/not_applied.py):

- an overflowing step is always skipped; the scale is halved only once ``hysteresis`` overflows
  have been counted since the last growth (``hysteresis`` 1: at every overflow), never below
  ``min_loss_scale``;
- after ``loss_scale_window`` steps without overflow the scale doubles and the overflow count
  starts again;
- the first scale is ``2**initial_scale_power``.

torch's scaler does the skipping, the doubling after ``growth_interval`` clean steps and the
halving; :class:`DeepSpeedScaling` adds the rest after torch's ``update``: it restores the scale
torch halved while overflows are still tolerated, and floors a halved scale at the minimum. All
on the scale's device, with no host sync. One difference remains: DeepSpeed stops the run when a
step overflows at the minimum scale with no overflow left to tolerate ("Current loss scale already
at minimum"); here the step is skipped and the scale stays at the minimum (the Trainer's log shows
the skipped steps as a loss that does not move). The count of overflows left is saved with the
scaler's state (``hysteresis_left``), so a resumed run goes on as it would have.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

HYSTERESIS_LEFT = "hysteresis_left"
"""The scaler's state_dict key for the overflows still tolerated before the next halving."""


class DeepSpeedScaling:
    """Mixin over a torch GradScaler: DeepSpeed's hysteresis and minimum scale ([Note: DeepSpeed's
    dynamic loss scale]). ``hysteresis`` is DeepSpeed's ``fp16.hysteresis`` (its ``delayed_shift``),
    ``min_scale`` its ``fp16.min_loss_scale``."""

    def __init__(self, *args: Any, hysteresis: int, min_scale: float, **kwargs: Any) -> None:
        if isinstance(hysteresis, bool) or not isinstance(hysteresis, int) or hysteresis < 1:
            raise ValueError(f"hysteresis must be an integer >= 1, got {hysteresis!r}")
        if not min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {min_scale!r}")
        super().__init__(*args, **kwargs)
        self.hysteresis = hysteresis
        self.min_scale = float(min_scale)
        self._left: torch.Tensor | None = None  # overflows still tolerated, on the scale's device
        self._left_loaded = hysteresis

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        scale = getattr(self, "_scale", None)  # torch's scale tensor, made at the first scale()
        if new_scale is not None or not self.is_enabled() or scale is None:
            super().update(new_scale)
            return
        before = scale.clone()
        super().update()  # skip bookkeeping, growth after loss_scale_window clean steps, halving
        after = self._scale
        if self._left is None or self._left.device != after.device:
            self._left = torch.full((), self._left_loaded, dtype=torch.int64, device=after.device)
        halved = after < before
        grew = after > before
        hold = halved & (self._left > 1)
        self._left = torch.where(grew, torch.full_like(self._left, self.hysteresis),
                                 torch.where(hold, self._left - 1, self._left))
        floored = torch.where(halved, after.clamp(min=self.min_scale), after)
        after.copy_(torch.where(hold, before, floored))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state:
            state[HYSTERESIS_LEFT] = int(self._left) if self._left is not None else self._left_loaded
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        left = state.pop(HYSTERESIS_LEFT, self.hysteresis)  # a scaler saved by torch's own: none counted yet
        super().load_state_dict(state)
        self._left_loaded, self._left = int(left), None


class DeepSpeedScaler(DeepSpeedScaling, torch.amp.GradScaler):
    """One process: nothing to agree on."""


class ShardedDeepSpeedScaler(DeepSpeedScaling, ShardedGradScaler):
    """Ranks that each hold a gradient shard: overflow agreed on by all of them."""


def sharded_grad_scaler(precision, device: torch.device) -> torch.amp.GradScaler:
    """The scaler for an fp16 run, from the config's ``fp16`` keys: initial scale
    2**initial_scale_power, doubled after loss_scale_window steps without overflow, halved after
    ``hysteresis`` overflows, never below min_loss_scale. Sharded (overflow agreed on by all ranks)
    when a process group exists; one rank alone has nothing to agree on."""
    cls = ShardedDeepSpeedScaler if dist.is_available() and dist.is_initialized() else DeepSpeedScaler
    return cls(
        device=device.type,
        init_scale=2.0 ** precision.initial_scale_power,
        growth_interval=precision.loss_scale_window,
        hysteresis=precision.hysteresis,
        min_scale=precision.min_loss_scale,
    )
