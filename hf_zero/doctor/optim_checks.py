"""The ``optimizer`` and ``scheduler`` rows: what will run, and where each value will come from.

Before anything runs, so "auto" values are named with what fills them (TrainingArguments), not
filled: the same line the Trainer prints once it builds them (hf_zero/trainer/config_blocks.py,
hf_zero/config/block_plan.py). Without a block, the row says the Trainer's own runs. A type
hf_zero cannot build is SKIPped: the ``config`` row FAILs, naming it (config/unsupported.py).
"""

from __future__ import annotations

from typing import Any

from hf_zero.doctor.result import CheckResult, passed, skipped

OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"

_TRAINERS = {
    OPTIMIZER: "the Trainer's own (TrainingArguments.optim, learning_rate, weight_decay, adam_*; weight decay "
               "not on biases and norms): no optimizer block in {source}",
    SCHEDULER: "the Trainer's own (TrainingArguments.lr_scheduler_type, warmup_steps / warmup_ratio): "
               "no scheduler block in {source}",
}


def check_blocks(config: Any) -> list[CheckResult]:
    """One row for each block (SKIP without a loaded config)."""
    from hf_zero.config.block_plan import optimizer_plan, scheduler_plan
    from hf_zero.config.optimizer_block import refused

    if config is None:
        return [skipped(OPTIMIZER, "no config loaded"), skipped(SCHEDULER, "no config loaded")]
    source = config.source or "the config"
    rows = []
    for name, spec, plan in ((OPTIMIZER, config.optimizer, optimizer_plan), (SCHEDULER, config.scheduler,
                                                                            scheduler_plan)):
        if spec is None:
            rows.append(passed(name, _TRAINERS[name].format(source=source)))
        elif name == OPTIMIZER and refused(spec.type) is not None:
            rows.append(skipped(name, f"optimizer.type {spec.type!r} is refused (the config row says why)"))
        else:
            rows.append(passed(name, plan(spec).describe(config.source).removeprefix(f"{name} ")))
    return rows
