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

[Note: fused steps under the sharded scaler] torch's fused optimizers (``adamw_torch_fused``,
the Trainer's default) take the scaler's ``found_inf`` into their own step, and two things in
torch's ``ShardedGradScaler`` (read in torch 2.13) break them:
- its ``unscale_`` makes ``found_inf`` of shape ``(1,)``, which the fused step subtracts from
  its 0-dim step counts: ``output with shape [] doesn't match the broadcast shape [1]`` at the
  first step of every fp16 run with a process group. And the flags are all-reduced as a sum, so
  with two ranks overflowing the flag is 2, while the fused kernels skip only where it equals 1:
  they stepped with the overflowed grads. :class:`ShardedDeepSpeedScaler` hands the agreed flags
  on as 0-dim 0/1 tensors.
- where nothing unscaled first (``max_grad_norm`` 0: the Trainer does not clip), torch's ``step``
  checks for overflow with ``GradScaler._check_inf_per_device``, which sees this rank's shard
  only: the ranks could disagree on skipping. ``DeepSpeedScaling.step`` (below) unscales first
  instead, through ``unscale_``, which agrees on the flags.

And at every world size (:class:`DeepSpeedScaling`): for a fused optimizer torch's ``step`` always
calls ``optimizer.step()`` and lets the kernel skip an overflowed step, so accelerate, which calls
a step skipped only when ``optimizer.step()`` was not called, tells the Trainer that nothing was
skipped, and the Trainer advances its LR schedule past every overflow. DeepSpeed does not, and
neither does torch's own path for other optimizers. So a fused optimizer's overflowed step is
skipped here as the other optimizers' is: the grads are unscaled first where they were not (one
pass, only with clipping off), the agreed flag is read on the host (the sync the other path has),
and ``optimizer.step()`` is not called.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.amp.grad_scaler import OptState
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

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """torch's ``step``, except that a fused optimizer's overflowed step is not called at all
        ([Note: fused steps under the sharded scaler])."""
        if self.is_enabled() and getattr(optimizer, "_step_supports_amp_scaling", False):
            state = self._per_optimizer_states[id(optimizer)]
            if state["stage"] is OptState.READY:
                self.unscale_(optimizer)
            if any(flag.item() for flag in state["found_inf_per_device"].values()):
                state["stage"] = OptState.STEPPED  # as after torch's own skipped step; update() halves
                return None
        return super().step(optimizer, *args, **kwargs)

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
    """Ranks that each hold a gradient shard: overflow agreed on by all of them, in the shape the
    fused optimizers take ([Note: fused steps under the sharded scaler])."""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)  # all-reduces the flags
        if self._enabled:
            self._as_scalars(optimizer)

    def _as_scalars(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = self._per_optimizer_states[id(optimizer)]
        flags = state["found_inf_per_device"]
        state["found_inf_per_device"] = {d: f.reshape(()).clamp(max=1.0) for d, f in flags.items()}
        return state["found_inf_per_device"]


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
