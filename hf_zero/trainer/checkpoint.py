"""Trainer checkpoints under hf_zero (stage >= 1): every rank saves and loads its own part.

A checkpoint directory written by the Trainer holds, besides what the Trainer writes itself
(full model weights, scheduler, RNG states per rank, trainer state), the sharded state of the
engine in ``hf_zero_sharded/`` (hf_zero/checkpoint/sharded.py): fp32 masters and optimizer
state through ``torch.distributed.checkpoint``, which every rank writes in parallel and which
loads at any world size and stage. A checkpoint of another model, or with a missing or
truncated file, is refused with an error naming the file and what is wrong, before training
starts and before anything is changed.

[Note: completion marker]
Completion is per save, not per directory. ``hf_zero_complete.json`` seals one save: the run
that wrote it (a run id drawn once per ``train()``), the global step, the world size and the
stage. A save into ``checkpoint-N`` first removes any marker there (``invalidate``, before any
rank writes, then a barrier), so a save cut short over an earlier complete ``checkpoint-N`` (a
re-run into the same output dir) leaves no marker, not the earlier run's beside the new files.
Once every rank is done, rank 0 writes the new marker. A marker counts only where it matches
the folder it sits in: its step is ``trainer_state.json``'s ``global_step`` (and ``N`` of a
``checkpoint-N`` folder), its world size and stage those of ``hf_zero_sharded/``'s description,
its run id that of the sharded state's digest manifests (a same-step save of another run copied
in is not this save).
``resume_from_checkpoint=True`` takes the newest checkpoint with a valid marker; an explicit
path without one is refused unless ``HF_ZERO_FORCE_RESUME=1``.

[Note: rotation]
With ``save_total_limit`` the Trainer deletes old checkpoints at the end of its save, before hf_zero
has sealed the new one: a crash in between would leave no complete checkpoint. At stage >= 1
hf_zero owns the rotation. While a save runs, the Trainer's limit is held at None, so a rotation of
transformers' at any point of the save deletes nothing; once every rank's part is written and the
marker is sealed, ``rotate`` deletes, knowing the markers: never the checkpoint just sealed, the
newest complete one or the best one; folders without a valid marker (saves cut short) go first,
then complete ones, oldest step first, until ``save_total_limit`` remain. It calls no transformers
function, so a transformers that moves or renames its rotation changes nothing here; a rotation
of the Trainer's after the save (the end of ``train()`` with ``load_best_model_at_end``) finds
every checkpoint of this run complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from hf_zero.checkpoint import dcp_disk, digests, pipeline_parts, sharded
from hf_zero.checkpoint.atomic import Swap, as_disk_full
from hf_zero.checkpoint.sharded import CheckpointError
from hf_zero.tensor_parallel.split import whole_shapes

logger = logging.getLogger(__name__)
SCHEDULER_NAME = "scheduler.pt"  # the Trainer's own file name
TRAINER_STATE_NAME = "trainer_state.json"  # the Trainer's own file name
COMPLETE_NAME = "hf_zero_complete.json"  # [Note: completion marker]
FORCE_ENV = "HF_ZERO_FORCE_RESUME"  # 1: resume from a checkpoint without a valid marker
_SEAL_KEYS = {"run_id": str, "global_step": int, "world_size": int, "stage": int}


def save(engine, output_dir: str, *, run_id: str | None, step: int | None) -> None:
    """Every rank writes its part of the engine's state (a collective: all ranks call it), its
    digest manifest naming ``run_id`` and ``step``. A full disk on any rank is raised on every
    rank as the ``DiskFullError`` of the lowest rank that hit it (dcp_disk.py), not as DCP's
    ``CheckpointException``."""
    os.makedirs(output_dir, exist_ok=True)
    try:
        sharded.save(engine, output_dir, run_id=run_id, step=step)
    except BaseException as error:
        full = dcp_disk.unwrap(error) or as_disk_full(error, os.path.join(output_dir, sharded.DIR_NAME), None)
        if full is None:
            raise
        raise full from None  # DCP's wrapper holds only the same message per rank


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


def trainable_shapes(model, engine=None, *, pipeline: bool = False) -> dict[str, tuple[int, ...]]:
    """Full shapes: a tensor-parallel part counts as its whole param, as the checkpoint stores it;
    ``pipeline``: the whole model's, every stage's params together (a collective: every rank calls)."""
    shapes = sharded.full_shapes(engine) if engine is not None else whole_shapes(model)
    return pipeline_parts.union_shapes(shapes) if pipeline else shapes


def load(engine, checkpoint: str) -> None:
    """Restore the engine's state from ``checkpoint`` (any world size and stage); ``sharded.load``
    runs the same checks as ``check`` before it changes anything."""
    _require_sharded_state(checkpoint)
    sharded.load(engine, checkpoint)


def invalidate(directory: str) -> None:
    """Remove the marker of ``directory`` before a save writes into it ([Note: completion marker])."""
    marker = os.path.join(directory, COMPLETE_NAME)
    if os.path.lexists(marker):
        os.unlink(marker)


def mark_complete(directory: str, *, run_id: str, global_step: int, world_size: int, stage: int) -> None:
    """Rank 0, after a barrier: the save of ``global_step`` in ``directory`` is whole."""
    seal = {"run_id": run_id, "global_step": global_step, "world_size": world_size, "stage": stage}
    swap = Swap(directory)
    with swap:
        with open(swap.temp(COMPLETE_NAME), "w") as f:
            json.dump(seal, f)
        swap.commit()


def record_training_args(directory: str, args) -> None:
    """Rank 0, after the Trainer's save: its ``training_args.bin`` again, from ``args`` as the user
    set them. The Trainer wrote the file while hf_zero held ``save_total_limit`` at None ([Note:
    rotation]), so it recorded None; a run that reads the file back (to relaunch with the same
    arguments) would keep every checkpoint. Only where the Trainer wrote one (``save_only_model``
    and the other paths that write none stay so). transformers never loads this pickle, nor does
    hf_zero."""
    import torch
    from transformers.trainer import TRAINING_ARGS_NAME

    if not os.path.isfile(os.path.join(directory, TRAINING_ARGS_NAME)):
        return
    swap = Swap(directory)
    with swap:
        torch.save(args, swap.temp(TRAINING_ARGS_NAME))
        swap.commit()


def marker_problem(directory: str) -> str | None:
    """Why ``directory`` has no valid completion marker ([Note: completion marker]), or None."""
    marker = os.path.join(directory, COMPLETE_NAME)
    if not os.path.isfile(marker):
        return f"{marker} is missing (the save was cut short, or another one into this folder was)"
    seal = _read_json(marker)
    if not isinstance(seal, dict) or not all(isinstance(seal.get(k), t) for k, t in _SEAL_KEYS.items()):
        return (f"{marker} holds {seal!r}, not a completion marker of this hf_zero (keys "
                f"{', '.join(_SEAL_KEYS)}); it was written by an older version or damaged")
    step = seal["global_step"]
    prefix, _, n = os.path.basename(os.path.normpath(directory)).partition("-")
    if prefix == "checkpoint" and n.isdigit() and int(n) != step:
        return f"{marker} seals step {step}, but the folder is checkpoint-{n}"
    state = _read_json(os.path.join(directory, TRAINER_STATE_NAME))
    saved = state.get("global_step") if isinstance(state, dict) else None
    if saved != step:
        return (f"{marker} seals step {step} of run {seal['run_id']}, but "
                f"{os.path.join(directory, TRAINER_STATE_NAME)} is at global_step {saved}: the marker is from "
                "another save")
    meta = _read_json(os.path.join(directory, sharded.DIR_NAME, sharded.META_NAME))
    if isinstance(meta, dict) and (meta.get("world_size"), meta.get("stage")) != (seal["world_size"], seal["stage"]):
        return (f"{marker} seals a save at world size {seal['world_size']}, stage {seal['stage']}, but "
                f"{os.path.join(directory, sharded.DIR_NAME, sharded.META_NAME)} was written at world size "
                f"{meta.get('world_size')}, stage {meta.get('stage')}: the marker is from another save")
    manifest_file = digests.manifest_path(os.path.join(directory, sharded.DIR_NAME), 0)
    manifest = _read_json(manifest_file)
    if isinstance(manifest, dict) and manifest.get("run_id") != seal["run_id"]:
        return (f"{marker} seals step {step} of run {seal['run_id']}, but {manifest_file} records run "
                f"{manifest.get('run_id')!r}: the sharded state is another run's save")
    return None


def require_complete(directory: str) -> None:
    """Refuse an explicit ``resume_from_checkpoint`` without a valid marker, unless forced."""
    problem = marker_problem(directory)
    if problem is None:
        return
    value = os.environ.get(FORCE_ENV, "")
    if value not in ("", "0", "1"):
        raise CheckpointError(f"{FORCE_ENV}={value!r}: allowed values are 1 (resume anyway) and 0 or unset")
    if value == "1":
        logger.warning("hf_zero: resuming from %s although %s (%s=1)", directory, problem, FORCE_ENV)
        return
    raise CheckpointError(
        f"resume_from_checkpoint={directory!r} is not a complete hf_zero checkpoint: {problem}. Resume from "
        f"an earlier checkpoint (resume_from_checkpoint=True takes the newest complete one), or set "
        f"{FORCE_ENV}=1 to resume from it anyway"
    )


def newest_complete(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` with a valid completion marker, or None."""
    for directory in reversed(_checkpoint_folders(output_dir)):
        problem = marker_problem(directory)
        if problem is None:
            return directory
        logger.info("hf_zero: resume_from_checkpoint=True skips %s: %s", directory, problem)
    return None


def _read_json(file: str):
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def rotate(run_dir: str, limit: int | None, *, current: str, best: str | None = None) -> list[str]:
    """Delete ``checkpoint-N`` folders of ``run_dir`` beyond ``limit`` (``save_total_limit``) after
    ``current`` was sealed ([Note: rotation]); returns the folders deleted."""
    if limit is None or limit <= 0:
        return []
    folders = _checkpoint_folders(run_dir)
    complete = {f: marker_problem(f) is None for f in folders}
    newest = next((f for f in reversed(folders) if complete[f]), None)
    protected = {os.path.realpath(p) for p in (current, newest, best) if p is not None}
    keep = max(limit, len(protected & {os.path.realpath(f) for f in folders}))
    candidates = [f for f in folders if os.path.realpath(f) not in protected]
    candidates.sort(key=lambda f: complete[f])  # stable: cut-short saves first, then complete ones, oldest first
    deleted = []
    for folder in candidates:
        if len(folders) - len(deleted) <= keep:
            break
        logger.info("hf_zero: deleting older checkpoint %s (save_total_limit=%d)", folder, limit)
        shutil.rmtree(folder, ignore_errors=True)
        deleted.append(folder)
    return deleted


def _checkpoint_folders(run_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders of ``run_dir``, oldest step first."""
    if not os.path.isdir(run_dir):
        return []
    steps = []
    for name in os.listdir(run_dir):
        prefix, _, step = name.partition("-")
        if prefix == "checkpoint" and step.isdigit() and os.path.isdir(os.path.join(run_dir, name)):
            steps.append(int(step))
    return [os.path.join(run_dir, f"checkpoint-{step}") for step in sorted(steps)]
