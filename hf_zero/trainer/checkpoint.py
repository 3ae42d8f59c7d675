"""Trainer checkpoints under hf_zero (stage >= 1): every rank saves and loads its own shard.

A checkpoint directory written by the Trainer holds, besides what the Trainer writes itself
(full model weights, scheduler, RNG states per rank, trainer state), one file per rank:
``hf_zero_optim_rank{r}_of_{W}.pt`` with that rank's optimizer state, fp32 master shards, the
stage, the world size and the param layout. Each file is written under a temporary name and
renamed when complete, and once every rank is done rank 0 writes ``hf_zero_complete.json``:
``resume_from_checkpoint=True`` takes the newest checkpoint that has it, so a save cut short
(a crash, a killed rank) leaves the previous checkpoint in use. Resuming needs the same stage, world size and model: anything else is
refused with an error naming the file and what differs, before training starts.
"""

from __future__ import annotations

import json
import os

import torch

from hf_zero.engine.stages import NotAvailableYet

SCHEDULER_NAME = "scheduler.pt"  # the Trainer's own file name
COMPLETE_NAME = "hf_zero_complete.json"  # written last, once every rank has finished its part


def shard_path(directory: str, rank: int, world_size: int) -> str:
    return os.path.join(directory, f"hf_zero_optim_rank{rank}_of_{world_size}.pt")


def save(engine, output_dir: str) -> None:
    """Write this rank's shard file atomically (temporary name, then rename)."""
    os.makedirs(output_dir, exist_ok=True)
    path = shard_path(output_dir, engine.ctx.rank, engine.ctx.world_size)
    tmp = path + ".tmp"
    torch.save(engine.checkpoint_state(), tmp)
    os.replace(tmp, path)


def load(engine, checkpoint: str) -> None:
    """Check and restore this rank's shard file from ``checkpoint``."""
    rank, world = engine.ctx.rank, engine.ctx.world_size
    path = shard_path(checkpoint, rank, world)
    if not os.path.isfile(path):
        found = sorted(f for f in os.listdir(checkpoint) if f.startswith("hf_zero_optim_rank"))
        if found:
            raise NotAvailableYet(
                f"{checkpoint}: this run has world size {world}, but the checkpoint holds {found[0]} ...: resuming "
                "at another world size is not implemented yet in hf_zero; resume with the world size it was written with"
            )
        raise ValueError(
            f"{path} is missing: {checkpoint} holds no hf_zero optimizer shards (written without hf_zero, or "
            "with stage 0); resume it without --zero_config, or start from its model weights"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    stage = engine.strategy.stage
    if state["stage"] != stage:
        raise NotAvailableYet(
            f"{path} was written at zero_optimization.stage {state['stage']}, this run uses stage {stage}: "
            "resuming at another stage is not implemented yet in hf_zero"
        )
    if state["layout"] != engine.layout() and sorted(state["layout"]) != sorted(engine.layout()):
        missing = sorted(set(engine.layout()) - set(state["layout"]))[:3]
        extra = sorted(set(state["layout"]) - set(engine.layout()))[:3]
        raise ValueError(
            f"{path} belongs to another model: params of this model not in it {missing}, params in it not in "
            f"this model {extra}"
        )
    engine.load_checkpoint_state(state)


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
