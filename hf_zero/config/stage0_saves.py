"""Checkpoint saves at ZeRO stage 0 with tensor parallelism or pipeline stages, and at any stage with the two
together: not built yet, one message.

At ZeRO stage 0 the Trainer writes its own optimizer file, which would hold one tp rank's (one
pipeline stage's) state only; stages 1-3 (1-2 with pipeline stages) write every part ([Note:
tensor-parallel parts] in hf_zero/checkpoint/sharded.py, [Note: pipeline parts] in
hf_zero/checkpoint/pipeline_parts.py). The (pp, dp, tp) mesh of both together trains and saves its full
weights (``save_model``), but its sharded checkpoints (each stage's tp parts and the description of the
whole model together) are not built yet: refused at every ZeRO stage. Whether a run saves is ``TrainingArguments.save_strategy``,
which no config holds, so this is not a row of the table of unsupported configs
(config/unsupported.py) but a refusal of the pair (config, save_strategy), worded here only:

| caller | save_strategy from | outcome |
|---|---|---|
| Trainer creation (trainer/tensor_parallel.py, trainer/pipeline.py) | TrainingArguments | ``NotAvailableYet`` |
| ``hf-zero launch`` preflight (doctor/config_checks.py) | the script's ``--save_strategy``, else the Trainer's default ``"steps"`` | FAIL: no rank starts (``--skip_doctor`` for a script that sets it in its code) |
| ``hf-zero check-config``, ``hf-zero doctor`` | unknown (no script arguments) | a note / WARN: the script needs ``--save_strategy no`` |
"""

from __future__ import annotations

from typing import Any, NamedTuple

DEFAULT_SAVE_STRATEGY = "steps"
"""TrainingArguments.save_strategy's default: a script that passes nothing saves every save_steps."""
NO_SAVES = "no"


class _NotBuilt(NamedTuple):
    """A split whose checkpoints are not built: what the config asks for, why, and what saves instead."""

    asked: str  # "tensor_parallel.autotp_size = 2 at ZeRO stage 0"
    why: str  # the parenthesis after "is not built yet", or ""
    instead: str  # the sentence after "use"


def _not_built(config: Any) -> _NotBuilt | None:
    """The split (tp, pipeline stages or both) whose checkpoints are not built yet under ``config``, else None."""
    tp, pp = config.tensor_parallel.autotp_size, config.pipeline.stages
    save_model = "save_strategy \"no\" and trainer.save_model() for the full weights"
    if tp > 1 and pp > 1:  # the (pp, dp, tp) mesh: every ZeRO stage
        return _NotBuilt(f"pipeline.stages = {pp} and tensor_parallel.autotp_size = {tp}", "",
                         f"{save_model}, or one of the two for checkpoints")
    if config.zero.stage != 0:
        return None
    if tp > 1:
        stages, part, key, size = "1-3", "one tp rank's", "tensor_parallel.autotp_size", tp
    elif pp > 1:
        stages, part, key, size = "1 or 2", "one stage's", "pipeline.stages", pp
    else:
        return None
    return _NotBuilt(f"{key} = {size} at ZeRO stage 0", f" (the Trainer's optimizer file would hold {part} state only)",
                     f"zero_optimization.stage {stages}, whose sharded checkpoints hold every part, or {save_model}")


def checkpoint_refusal(config: Any, what: str) -> str | None:
    """The message refusing ``what`` ("a checkpoint save", "resume_from_checkpoint") under ``config``, or
    None: the Trainer's own optimizer file at ZeRO stage 0 would hold one part's state only, and no
    checkpoint of the (pp, dp, tp) mesh is built yet."""
    split = _not_built(config)
    if split is None:
        return None
    return f"{what} with {split.asked} is not built yet{split.why}; use {split.instead}"


def refusal(config: Any, save_strategy: str) -> str | None:
    """The message refusing ``save_strategy`` (a TrainingArguments value: "steps", "epoch", "best", "no")
    under ``config``, or None: for ``{"tensor_parallel": {"autotp_size": 2}}`` and "steps",
    ``save_strategy 'steps': a checkpoint save with tensor_parallel.autotp_size = 2 at ZeRO stage 0 is not
    built yet; use zero_optimization.stage 1-3, whose sharded ... or save_strategy "no" and trainer.save_model() ...``."""
    split = _not_built(config)
    if split is None or save_strategy == NO_SAVES:
        return None
    return f"save_strategy {save_strategy!r}: {checkpoint_refusal(config, 'a checkpoint save')}"


def needs_no_saves(config: Any) -> str | None:
    """For ``check-config`` and ``doctor``, which do not see the script's arguments: one sentence saying
    the script must pass ``--save_strategy no``, with the refusal it gets otherwise; None if any strategy runs."""
    message = refusal(config, DEFAULT_SAVE_STRATEGY)
    if message is None:
        return None
    return (f"the script must pass --save_strategy no (TrainingArguments' default is {DEFAULT_SAVE_STRATEGY!r}); "
            f"`hf-zero launch` refuses it otherwise, before any rank starts: {message}")


__all__ = ["DEFAULT_SAVE_STRATEGY", "needs_no_saves", "refusal"]
