"""fp16 dynamic loss scaling for stages >= 1: torch's ``ShardedGradScaler``.

Each rank holds only its gradient shard, so whether any gradient overflowed must be agreed on by
all ranks: ``ShardedGradScaler`` all-reduces the found-inf flag, then every rank skips the step
(and halves the scale) together, as the Trainer and DeepSpeed do. The engine drops the skipped
step's gradients when the Trainer calls ``model.zero_grad()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from hf_zero.config.key_warning import warn_at_key


def check_loss_scaling(precision, source: str | None = None) -> None:
    """Warn, once per job and at the key in ``source`` (the config file), about what torch's scaler
    does differently. (A static loss scale, which it cannot honour, is refused before: a row of
    hf_zero/config/unsupported.py.)"""
    ignored = []
    if precision.hysteresis != 1:
        ignored.append(("fp16.hysteresis", precision.hysteresis))
    if precision.min_loss_scale != 1:
        ignored.append(("fp16.min_loss_scale", precision.min_loss_scale))
    if ignored:
        warn_at_key(
            "hf_zero does not apply " + ", ".join(f"{key} = {value}" for key, value in ignored)
            + f"{f' in {source}' if source else ''}: torch's GradScaler halves the scale at every overflowing step "
            "(hysteresis 1) and has no floor", source, ignored[0][0])


def sharded_grad_scaler(precision, device: torch.device) -> torch.amp.GradScaler:
    """The scaler for an fp16 run: initial scale 2**initial_scale_power, doubled after
    loss_scale_window steps without overflow, halved on overflow. Sharded (overflow agreed on
    by all ranks) when a process group exists; one rank alone has nothing to agree on."""
    cls = ShardedGradScaler if dist.is_available() and dist.is_initialized() else torch.amp.GradScaler
    return cls(
        device=device.type,
        init_scale=2.0 ** precision.initial_scale_power,
        growth_interval=precision.loss_scale_window,
    )
