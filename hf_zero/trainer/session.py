"""``ZeroSession``: what hf_zero knows about one Trainer, kept in a side table (not on the Trainer)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from hf_zero.engine import ZeroEngine

_ACTIVE: dict[str, Any] = {"config": None}
_SESSIONS: "weakref.WeakKeyDictionary[Any, ZeroSession]" = weakref.WeakKeyDictionary()


@dataclass
class ZeroSession:
    """The resolved config for one Trainer and the engine built for it (stage >= 1)."""

    config: Any  # hf_zero.config.HfZeroConfig, no "auto" left
    trainer_ref: Any  # weakref to the Trainer
    # The config as read ("auto" kept): where each optimizer/scheduler value came from (config_blocks.py).
    loaded: Any = None
    engine: ZeroEngine | None = None
    figures: dict = field(default_factory=dict)
    # Drawn once per train() on rank 0, the same on every rank; names the run in each checkpoint's
    # completion marker (checkpoint.py, [Note: completion marker]).
    run_id: str | None = None
    # hf_zero.activations.TrainerActivations when the config asks for CPU checkpointing or tiled compute.
    activations: Any = None
    # hf_zero.sequence_parallel.SpLayout when sequence_parallel_size > 1 (sequence_parallel/training.py).
    sequence_parallel: Any = None
    # --torch_compile with TORCHDYNAMO_SUPPRESS_ERRORS=1: each code object torch ran eagerly instead, and why
    # (compile_watch.py, [Note: compile failures]); the run report's ranks[].compile_fallbacks.
    compile_fallbacks: list = field(default_factory=list)

    @property
    def stage(self) -> int:
        return self.config.zero.stage

    @property
    def trainer(self):
        return self.trainer_ref()

    @property
    def model_parallel_size(self) -> int:
        """The ranks that share one batch: a sequence-parallel group (``sequence_parallel_size``) times a
        tensor-parallel one (``tensor_parallel.autotp_size``) times a pipeline (``pipeline.stages``); the world size over it counts the
        data-parallel ranks, each training on its own batches (config/resolve.py's ``train_batch_size``)."""
        return self.config.sequence_parallel_size * self.config.tensor_parallel.autotp_size * self.config.pipeline.stages


def active_config():
    """The config passed to ``hf_zero.activate`` in this process, or None."""
    return _ACTIVE["config"]


def set_active_config(config) -> None:
    _ACTIVE["config"] = config


def session_of(trainer) -> ZeroSession | None:
    return _SESSIONS.get(trainer)


def attach(trainer, session: ZeroSession) -> None:
    _SESSIONS[trainer] = session
