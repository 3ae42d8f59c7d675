"""What differs between ZeRO stages, in one place.

| stage | optimizer state | gradients                               | parameters |
|-------|-----------------|-----------------------------------------|------------|
| 1     | sharded (1/W)   | full while accumulating; reduce-scattered once, on the last micro-step | full |
| 2     | sharded (1/W)   | reduce-scattered every micro-step, only the shard is kept | full |
| 3     | sharded (1/W)   | as stage 2, one bucket per unit         | sharded in units, gathered around use |

Stage 0 is the Trainer's own data parallelism (DDP); no engine is built for it.
"""

from __future__ import annotations

from dataclasses import dataclass


class NotAvailableYet(NotImplementedError, ValueError):
    """A config asks for a feature this version of hf_zero does not implement yet."""


@dataclass(frozen=True)
class StageStrategy:
    """The knobs that make one stage differ from another."""

    stage: int
    reduce_every_microstep: bool
    """Stage 2 cannot keep full gradients across micro-steps, so it reduces after each backward;
    stage 1 keeps them and communicates only on the gradient-accumulation boundary."""
    shard_params: bool = False
    """Stage 3: params live as shards in units (units.py), gathered around forward and backward;
    buckets are the units, and the optimizer step needs no all-gather afterwards."""


AVAILABLE_STAGES = {
    1: StageStrategy(stage=1, reduce_every_microstep=False),
    2: StageStrategy(stage=2, reduce_every_microstep=True),
    3: StageStrategy(stage=3, reduce_every_microstep=True, shard_params=True),
}


def strategy_for(stage: int) -> StageStrategy:
    """The strategy of ``stage``; a clear error for a stage this version does not implement."""
    if stage in AVAILABLE_STAGES:
        return AVAILABLE_STAGES[stage]
    raise ValueError(f"zero_optimization.stage must be one of 0, 1, 2, 3; got {stage!r}")


def check_supported(stage: int, offload_optimizer: str = "none", offload_param: str = "none") -> None:
    """Raise before any process group exists if the config asks for something not built yet."""
    if stage != 0:
        strategy_for(stage)
    if offload_optimizer not in ("none", "cpu", "nvme"):
        raise ValueError(f"zero_optimization.offload_optimizer.device must be one of 'none', 'cpu', 'nvme'; "
                         f"got {offload_optimizer!r}")
    if offload_param not in ("none", "cpu", "nvme"):
        raise ValueError(f"zero_optimization.offload_param.device must be one of 'none', 'cpu', 'nvme'; "
                         f"got {offload_param!r}")
