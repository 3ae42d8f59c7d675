"""What differs between ZeRO stages, in one place.

| stage | optimizer state | gradients                               | parameters |
|-------|-----------------|-----------------------------------------|------------|
| 1     | sharded (1/W)   | full while accumulating; reduce-scattered once, on the last micro-step | full |
| 2     | sharded (1/W)   | reduce-scattered every micro-step, only the shard is kept | full |
| 3     | sharded (1/W)   | as stage 2, one bucket per unit         | sharded in units, gathered around use |

Stage 0 is the Trainer's own data parallelism (DDP); no engine is built for it.

``StageStrategy`` is the table's knobs (read by config checks and checkpoints); ``StageBehaviour``
is what a running engine does differently per stage, in two implementations: ``FlatStrategy``
(stages 1-2, flat_strategy.py) and ``UnitStrategy`` (stage 3, unit_strategy.py); ``strategies.py``
picks one. ``ZeroEngine`` itself has no stage branches.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from hf_zero.engine.offload.settings import TIERS


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


class StageBehaviour(abc.ABC):
    """How an engine lays out, hooks and accounts its params at one stage (see the module note).

    The engine calls, in order: ``build`` (buffers and ``ShardedBucket``s; again after the first
    backward when ``order_by_arrival`` returns a new order), ``install`` (forward/backward hooks),
    then per backward ``on_grads_done`` for each bucket whose grads are all in and
    ``on_backward_end``; ``close`` at the end."""

    def __init__(self, knobs: StageStrategy) -> None:
        self.knobs = knobs
        self.units: list = []  # stage 3: the ParamUnits, in backward order
        self.param_memory = None  # stage 3 parameter offload: where the host shards live (tiers.py)

    @property
    def stage(self) -> int:
        return self.knobs.stage

    @property
    def reduce_every_microstep(self) -> bool:
        return self.knobs.reduce_every_microstep

    @property
    def shard_params(self) -> bool:
        return self.knobs.shard_params

    @abc.abstractmethod
    def build(self, named: list, *, first: bool) -> tuple[list, list]:
        """Pack the trainable ``named`` params: (flat buffers, ShardedBuckets in launch order)."""

    def install(self) -> list:
        """Hooks this stage needs on the model (removable handles)."""
        return []

    def tracks_arrival(self, world_size: int) -> bool:
        """Whether the first backward's gradient order should re-pack the buffers."""
        return False

    def order_by_arrival(self, arrival: list, params: list, buffers: list) -> list | None:
        """The params in their new packing order, or None when the layout stays."""
        return None

    def check_repack(self) -> None:
        """Raise if this stage's buffers can never be re-packed (resume in a saved layout)."""

    def on_grads_done(self, bucket) -> None:
        """Every gradient of ``bucket`` (a ShardedBucket) is in, in this backward."""

    def on_backward_end(self) -> None:
        """The autograd engine has finished this backward."""

    @abc.abstractmethod
    def param_bytes(self, buffers: list) -> int:
        """Bytes of the packed params this rank holds on the device now."""

    def close(self) -> None:
        """Release what the stage holds outside the engine's buffers (swap files)."""


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
    allowed = ("none",) + TIERS
    for key, device in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        if device not in allowed:
            raise ValueError(f"zero_optimization.{key}.device must be one of {', '.join(map(repr, allowed))}; "
                             f"got {device!r}")
