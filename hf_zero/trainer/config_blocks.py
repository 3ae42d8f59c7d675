"""The config's ``optimizer`` and ``scheduler`` blocks in the Trainer, built where it builds its own.

As transformers' DeepSpeed integration does (``deepspeed_optim_sched``): a block present replaces
what the Trainer would build from TrainingArguments; a block absent leaves the Trainer's own, and
either may come without the other (a DeepSpeed schedule on the Trainer's optimizer, or the
Trainer's schedule on the block's optimizer).

- ``create_optimizer`` seam -> :func:`build_optimizer`: the torch optimizer DeepSpeed would run
  (``hf_zero/config/optimizer_block.py``) on the model's full trainable params, one group, before
  the engine rewrites its groups to hold shard pieces (``engine/pieces.py``);
- ``create_scheduler`` seam -> :func:`build_scheduler`: the step counts filled from
  ``num_training_steps`` (``resolve_config``), then DeepSpeed's schedule (``ds_schedulers.py``);
- ``__init__`` seam -> :func:`check_trainer`: a Trainer given its own optimizer or scheduler
  as well as a block for it is refused (transformers' DeepSpeed path drops the Trainer's silently).

Each build prints one line on the main process (``hf_zero: optimizer torch.optim.AdamW from
optimizer.type "AdamW" in ds.json: lr=5e-05 ("auto": TrainingArguments.learning_rate), ...``):
what runs, and whether each value was written in the file, filled from TrainingArguments for
"auto", or DeepSpeed's default (``hf_zero/config/block_plan.py``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from hf_zero.config import ConfigError, resolve_config
from hf_zero.config.block_plan import BlockPlan, optimizer_plan, scheduler_plan
from hf_zero.trainer.ds_schedulers import build_scheduler as build_schedule


def check_trainer(trainer: Any, config: Any) -> None:
    """Refuse a block and the Trainer's own argument for the same thing."""
    where = f" in {config.source}" if config.source else ""
    if config.optimizer is not None and (trainer.optimizer is not None
                                         or getattr(trainer, "optimizer_cls_and_kwargs", None) is not None):
        raise ConfigError(f"the optimizer block{where} and Trainer(optimizers=(optimizer, ...) or "
                          "optimizer_cls_and_kwargs=...) both choose the optimizer; remove one of them")
    if config.scheduler is not None and trainer.lr_scheduler is not None:
        raise ConfigError(f"the scheduler block{where} and Trainer(optimizers=(..., lr_scheduler)) both choose "
                          "the learning-rate schedule; remove one of them")


def _plans_of(session: Any) -> Any:
    """The config as read (for where values came from); the resolved one stands in without it."""
    return session.loaded if session.loaded is not None else session.config


def build_optimizer(trainer: Any, session: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The block's optimizer on ``model``'s trainable params, all in one group (as DeepSpeed)."""
    plan = optimizer_plan(_plans_of(session).optimizer, session.config.optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = getattr(torch.optim, plan.runs)(params, **plan.kwargs())
    # Adagrad fills its state in its constructor, a full-size tensor per param; its step makes the same
    # state (step 0, sum = initial_accumulator_value) for what it is given when that is empty, so it is
    # dropped: the engine takes an optimizer that has not stepped, and steps it on shard pieces.
    optimizer.state.clear()
    _say(trainer, plan, f"replaces the Trainer's --optim {_arg(trainer.args, 'optim')}", session.config.source)
    return optimizer


def build_scheduler(trainer: Any, session: Any, num_training_steps: int,
                    optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The block's DeepSpeed schedule on ``optimizer``, its step counts filled from ``num_training_steps``."""
    resolved = resolve_config(session.config, trainer.args, world_size=trainer.args.world_size,
                              num_training_steps=num_training_steps)
    plan = scheduler_plan(_plans_of(session).scheduler, resolved.scheduler)
    scheduler = build_schedule(plan.runs, optimizer, plan.kwargs())
    _say(trainer, plan, f"replaces the Trainer's --lr_scheduler_type {_arg(trainer.args, 'lr_scheduler_type')}",
         session.config.source)
    return scheduler


def _arg(args: Any, name: str) -> str:
    value = getattr(args, name, None)
    return str(getattr(value, "value", value))  # the enum's string


def _say(trainer: Any, plan: BlockPlan, replaces: str, source: str | None) -> None:
    if trainer.is_world_process_zero():
        print(f"hf_zero: {plan.describe(source)}; {replaces}", file=sys.stderr, flush=True)
