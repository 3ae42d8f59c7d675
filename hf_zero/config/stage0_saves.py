"""Checkpoint saves at ZeRO stage 0 with tensor parallelism, pipeline stages or both: not built yet, one message.

At ZeRO stage 0 the Trainer writes its own optimizer file, which would hold one tp rank's (one
pipeline stage's) state only; stages 1-3 (1-2 with pipeline stages, with or without tp) write every
part ([Note: tensor-parallel parts] in hf_zero/checkpoint/sharded.py, [Note: pipeline parts] in
hf_zero/checkpoint/pipeline_parts.py: the two compose, each stage's tp parts as boxes of the full tensors). Whether a run saves is ``TrainingArguments.save_strategy``,
which no config holds, so this is not a row of the table of unsupported configs
(config/unsupported.py) but a refusal of the pair (config, save_strategy), worded here only:

| caller | save_strategy from | outcome |
|---|---|---|
| Trainer creation (trainer/tensor_parallel.py, trainer/pipeline.py) | TrainingArguments | ``NotAvailableYet`` |
| ``hf-zero launch`` preflight (doctor/config_checks.py) | the script's ``--save_strategy``, else the Trainer's default ``"steps"`` | FAIL: no rank starts (``--skip_doctor`` for a script that sets it in its code) |
| ``hf-zero check-config``, ``hf-zero doctor`` | unknown (no script arguments) | a note / WARN: the script needs ``--save_strategy no`` |
"""

from __future__ import annotations

from typing import Any

DEFAULT_SAVE_STRATEGY = "steps"
"""TrainingArguments.save_strategy's default: a script that passes nothing saves every save_steps."""
NO_SAVES = "no"


def _split(config: Any) -> tuple[str, str, str] | None:
    """(what a stage-0 config splits, the ZeRO stages that save it, the part one rank holds) under tp, pipeline
    stages or both, else None."""
    if config.zero.stage != 0:
        return None
    tp, pp = config.tensor_parallel.autotp_size, config.pipeline.stages
    if tp > 1 and pp > 1:
        return f"pipeline.stages = {pp} and tensor_parallel.autotp_size = {tp}", "1 or 2", "one stage's tp rank's"
    if tp > 1:
        return f"tensor_parallel.autotp_size = {tp}", "1-3", "one tp rank's"
    if pp > 1:
        return f"pipeline.stages = {pp}", "1 or 2", "one stage's"
    return None


def checkpoint_refusal(config: Any, what: str) -> str | None:
    """The message refusing ``what`` ("a checkpoint save", "resume_from_checkpoint") under ``config``, or
    None: the Trainer's own optimizer file at ZeRO stage 0 would hold one part's state only."""
    split = _split(config)
    if split is None:
        return None
    asked, stages, part = split
    return (f"{what} with {asked} at ZeRO stage 0 is not built yet (the Trainer's optimizer file would hold {part} "
            f"state only); use zero_optimization.stage {stages}, whose sharded checkpoints hold every part, or "
            "save_strategy \"no\" and trainer.save_model() for the full weights")


def refusal(config: Any, save_strategy: str) -> str | None:
    """The message refusing ``save_strategy`` (a TrainingArguments value: "steps", "epoch", "best", "no")
    under ``config``, or None: for ``{"tensor_parallel": {"autotp_size": 2}}`` and "steps",
    ``save_strategy 'steps': a checkpoint save with tensor_parallel.autotp_size = 2 at ZeRO stage 0 is not
    built yet (...); use zero_optimization.stage 1-3, ... or save_strategy "no" and trainer.save_model() ...``."""
    if save_strategy == NO_SAVES:
        return None
    message = checkpoint_refusal(config, "a checkpoint save")
    return None if message is None else f"save_strategy {save_strategy!r}: {message}"


def needs_no_saves(config: Any) -> str | None:
    """For ``check-config`` and ``doctor``, which do not see the script's arguments: one sentence saying
    the script must pass ``--save_strategy no``, with the refusal it gets otherwise; None if any strategy runs."""
    message = refusal(config, DEFAULT_SAVE_STRATEGY)
    if message is None:
        return None
    return (f"the script must pass --save_strategy no (TrainingArguments' default is {DEFAULT_SAVE_STRATEGY!r}); "
            f"`hf-zero launch` refuses it otherwise, before any rank starts: {message}")


__all__ = ["DEFAULT_SAVE_STRATEGY", "needs_no_saves", "refusal"]
