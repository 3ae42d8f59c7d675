"""Trainer checkpoints under hf_zero (stage >= 1): every rank saves and loads its own part.

A checkpoint directory written by the Trainer holds, besides what the Trainer writes itself
(full model weights, scheduler, RNG states per rank, trainer state), the sharded state of the
engine in ``hf_zero_sharded/`` (hf_zero/checkpoint/sharded.py): fp32 masters and optimizer
state through ``torch.distributed.checkpoint``, which every rank writes in parallel and which
loads at any world size and stage. Once every rank is done, rank 0 writes
``hf_zero_complete.json``: ``resume_from_checkpoint=True`` takes the newest checkpoint that has
it, so a save cut short (a crash, a killed rank) leaves the previous checkpoint in use.
A checkpoint of another model, or with a missing or truncated file, is refused with an error
naming the file and what is wrong, before training starts and before anything is changed.
"""

from __future__ import annotations

import json
import os

from hf_zero.checkpoint import sharded
from hf_zero.checkpoint.sharded import CheckpointError

SCHEDULER_NAME = "scheduler.pt"  # the Trainer's own file name
COMPLETE_NAME = "hf_zero_complete.json"  # written last, once every rank has finished its part


def save(engine, output_dir: str) -> None:
    """Every rank writes its part of the engine's state (a collective: all ranks call it)."""
    os.makedirs(output_dir, exist_ok=True)
    sharded.save(engine, output_dir)


def _require_sharded_state(checkpoint: str) -> None:
    if not os.path.isdir(os.path.join(checkpoint, sharded.DIR_NAME)):
        raise CheckpointError(
            f"{os.path.join(checkpoint, sharded.DIR_NAME)} is missing: {checkpoint} holds no hf_zero sharded "
            "state (written without hf_zero, or with stage 0); resume it without --zero_config, or start from "
            "its model weights"
        )


def check(checkpoint: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a checkpoint that a model with these trainable params (name -> shape) cannot resume
    from, naming the file and what is wrong; cheap (reads metadata only)."""
    _require_sharded_state(checkpoint)
    sharded.check(checkpoint, shapes)


def trainable_shapes(model, engine=None) -> dict[str, tuple[int, ...]]:
    if engine is not None:
        return {e.name: e.shape for e in engine.shard_map()}
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def load(engine, checkpoint: str) -> None:
    """Restore the engine's state from ``checkpoint`` (any world size and stage); ``sharded.load``
    runs the same checks as ``check`` before it changes anything."""
    _require_sharded_state(checkpoint)
    sharded.load(engine, checkpoint)


def mark_complete(directory: str, world_size: int, stage: int) -> None:
    """Rank 0, after a barrier: the checkpoint in ``directory`` is whole."""
    tmp = os.path.join(directory, COMPLETE_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"world_size": world_size, "stage": stage}, f)
    os.replace(tmp, os.path.join(directory, COMPLETE_NAME))


def newest_complete(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that hf_zero marked complete, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        if prefix == "checkpoint" and step.isdigit() and os.path.isfile(os.path.join(output_dir, name, COMPLETE_NAME)):
            steps.append(int(step))
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None
