"""DeepSpeed's ``scheduler`` block: the five schedule types and the params each takes.

:data:`SCHEDULERS` is DeepSpeed 0.19's constructor signatures (``runtime/lr_schedules.py``):
every param with DeepSpeed's default, ``REQUIRED`` where it has none. The schedules themselves
are ``hf_zero/trainer/ds_schedulers.py``; ``tests/config/test_ds_lr_curves.py`` holds both
against curves and defaults taken from DeepSpeed's own code.

Checked when the file is read (so ``check-config``, ``doctor`` and the launcher refuse before
any rank starts): the type, unknown or missing params, and the values DeepSpeed itself refuses
when it builds the schedule (a step count < 1, a ``warmup_type`` other than log/linear, which
DeepSpeed would turn into "log" with only a warning).
"""

from __future__ import annotations

import difflib
from typing import Any

from hf_zero.config import checks
from hf_zero.config.auto import AUTO

REQUIRED = object()
"""Marks a param DeepSpeed's constructor has no default for."""

OPTIMIZER_LR = None
"""WarmupLR's ``warmup_max_lr`` default: the optimizer's own lr (per param group)."""

_WARMUP = {"warmup_min_lr": 0.0, "warmup_max_lr": OPTIMIZER_LR, "warmup_num_steps": 1000, "warmup_type": "log"}

SCHEDULERS: dict[str, dict[str, Any]] = {
    "WarmupLR": dict(_WARMUP),
    "WarmupDecayLR": {"total_num_steps": REQUIRED, **_WARMUP, "warmup_max_lr": 0.001},
    "WarmupCosineLR": {"total_num_steps": REQUIRED, "warmup_min_ratio": 0.0, "warmup_num_steps": 1000,
                       "cos_min_ratio": 0.0001, "warmup_type": "log"},
    "OneCycle": {"cycle_min_lr": REQUIRED, "cycle_max_lr": REQUIRED, "decay_lr_rate": 0.0,
                 "cycle_first_step_size": 2000, "cycle_second_step_size": None, "cycle_first_stair_count": 0,
                 "cycle_second_stair_count": None, "decay_step_size": 0, "cycle_momentum": True,
                 "cycle_min_mom": 0.8, "cycle_max_mom": 0.9, "decay_mom_rate": 0.0},
    "LRRangeTest": {"lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 2000, "lr_range_test_step_rate": 1.0,
                    "lr_range_test_staircase": False},
}
"""type -> {param: DeepSpeed's default}, in DeepSpeed's argument order."""

WARMUP_TYPES = ("log", "linear")

_PER_GROUP = {"warmup_min_lr", "warmup_max_lr", "cycle_min_lr", "cycle_max_lr", "cycle_min_mom", "cycle_max_mom",
              "lr_range_test_min_lr"}  # a number, or a list with one per param group
_POSITIVE = {"warmup_num_steps", "lr_range_test_step_size"}  # DeepSpeed refuses < 1
_BOOLEANS = {"cycle_momentum", "lr_range_test_staircase"}


def check(spec: Any) -> None:
    """Validate a SchedulerSpec: its type, that its params are the type's, and their values."""
    if spec.type not in SCHEDULERS:
        by_case = {name.lower(): name for name in SCHEDULERS}
        close = [by_case[spec.type.lower()]] if spec.type.lower() in by_case else \
            difflib.get_close_matches(spec.type, list(SCHEDULERS), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise checks.fail(spec, "type", f"not a DeepSpeed schedule hf_zero builds{hint}", value=spec.type,
                          allowed=", ".join(SCHEDULERS) + " (or leave the block out: the Trainer's "
                          "--lr_scheduler_type)")
    signature = SCHEDULERS[spec.type]
    for key, value in spec.params.items():
        if key not in signature:
            close = difflib.get_close_matches(key, list(signature), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise checks.fail(spec, f"params.{key}", f"not a parameter of {spec.type}{hint}", value=value,
                              allowed=", ".join(signature))
        _check_value(spec, key, value)
    for key, default in signature.items():
        if default is REQUIRED and key not in spec.params:
            raise checks.fail(spec, f"params.{key}", f"{spec.type} needs it (DeepSpeed has no default)",
                              value=None, allowed="a number" + (' or "auto"' if key == "total_num_steps" else ""))


def _check_value(spec: Any, key: str, value: Any) -> None:
    if value is AUTO:
        return  # json_params allowed "auto" only where resolve_config fills it
    where = f"params.{key}"
    if key == "warmup_type":
        if value not in WARMUP_TYPES:
            raise checks.fail(spec, where, "not a warmup type DeepSpeed has", value=value,
                              allowed=", ".join(f'"{t}"' for t in WARMUP_TYPES))
    elif key in _BOOLEANS:
        if not isinstance(value, bool):
            raise checks.fail(spec, where, "not a boolean", value=value, allowed="true or false")
    elif key in _PER_GROUP and isinstance(value, list):
        if not value or not all(_is_number(v) for v in value):
            raise checks.fail(spec, where, "not a list of numbers", value=value,
                              allowed="a number, or a list of numbers with one per param group")
    elif key == "warmup_max_lr" and value is None:
        return  # WarmupLR's own default: the optimizer's lr
    elif key in ("cycle_second_step_size", "cycle_second_stair_count") and value is None:
        return  # DeepSpeed: the first half's value
    elif not _is_number(value):
        raise checks.fail(spec, where, "not a number", value=value, allowed="a finite number")
    elif key in _POSITIVE and (not _is_integral(value) or value < 1):
        raise checks.fail(spec, where, "not an integer >= 1", value=value, allowed="an integer >= 1")
    elif key == "total_num_steps" and (not _is_integral(value) or value < 0):
        raise checks.fail(spec, where, "not an integer >= 0", value=value, allowed='an integer >= 0 or "auto"')
    elif key == "cycle_first_step_size" and value <= 0:
        raise checks.fail(spec, where, "not > 0", value=value, allowed="a number > 0")
    elif key in ("cycle_second_step_size", "cycle_first_stair_count", "cycle_second_stair_count",
                 "decay_step_size") and value < 0:
        raise checks.fail(spec, where, "not >= 0", value=value, allowed="a number >= 0")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integral(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
