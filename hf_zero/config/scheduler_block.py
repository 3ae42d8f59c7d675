"""DeepSpeed's ``scheduler`` block: its five schedule types, torch's it also takes, and their params.

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

TORCH_SCHEDULERS: dict[str, dict[str, Any]] = {
    "StepLR": {"step_size": REQUIRED, "gamma": 0.1},
    "MultiStepLR": {"milestones": REQUIRED, "gamma": 0.1},
    "ConstantLR": {"factor": 1 / 3, "total_iters": 5},
    "LinearLR": {"start_factor": 1 / 3, "end_factor": 1.0, "total_iters": 5},
    "ExponentialLR": {"gamma": REQUIRED},
    "PolynomialLR": {"total_iters": 5, "power": 1.0},
    "CosineAnnealingLR": {"T_max": REQUIRED, "eta_min": 0.0},
    "CosineAnnealingWarmRestarts": {"T_0": REQUIRED, "T_mult": 1, "eta_min": 0.0},
    "CyclicLR": {"base_lr": REQUIRED, "max_lr": REQUIRED, "step_size_up": 2000, "step_size_down": None,
                 "mode": "triangular", "gamma": 1.0, "scale_mode": "cycle", "cycle_momentum": True,
                 "base_momentum": 0.8, "max_momentum": 0.9},
    "OneCycleLR": {"max_lr": REQUIRED, "total_steps": None, "epochs": None, "steps_per_epoch": None,
                   "pct_start": 0.3, "anneal_strategy": "cos", "cycle_momentum": True, "base_momentum": 0.85,
                   "max_momentum": 0.95, "div_factor": 25.0, "final_div_factor": 10000.0, "three_phase": False},
}
"""``torch.optim.lr_scheduler`` classes a ``type`` may name -> {param: torch's default}, as DeepSpeed takes them.

DeepSpeed's ``_scheduler_from_config`` looks a type up in its own ``lr_schedules`` first, then in
``torch.optim.lr_scheduler``, and builds it with the params as written; its engine steps it once per
optimizer step with no argument, as the Trainer does. So hf_zero builds these the same way (written
params, torch's defaults, no "auto": transformers fills "auto" only for DeepSpeed's own schedules).
``last_epoch`` and ``scale_fn`` are left out: the Trainer's checkpoint restores the position, and JSON
cannot hold a function. ``tests/config/test_scheduler_block.py`` holds this table against torch's
signatures."""

TORCH_REFUSED: dict[str, str] = {
    "LambdaLR": "its lr_lambda is a Python function, which a JSON file cannot hold",
    "MultiplicativeLR": "its lr_lambda is a Python function, which a JSON file cannot hold",
    "SequentialLR": "it takes other scheduler objects, which a JSON file cannot hold",
    "ChainedScheduler": "it takes other scheduler objects, which a JSON file cannot hold",
    "ReduceLROnPlateau": "it steps on a metric, and DeepSpeed's engine (like the Trainer's per-step call) steps it "
                         "without one",
}
"""torch.optim.lr_scheduler classes a config cannot build -> why."""

_TRAINER_WAY = ("leave the scheduler block out and pass the script's --lr_scheduler_type (linear, cosine, "
                "cosine_with_restarts, polynomial, constant_with_warmup, ...) with --warmup_steps")

WARMUP_TYPES = ("log", "linear")

_PER_GROUP = {"warmup_min_lr", "warmup_max_lr", "cycle_min_lr", "cycle_max_lr", "cycle_min_mom", "cycle_max_mom",
              "lr_range_test_min_lr"}  # a number, or a list with one per param group
_POSITIVE = {"warmup_num_steps", "lr_range_test_step_size"}  # DeepSpeed refuses < 1
_BOOLEANS = {"cycle_momentum", "lr_range_test_staircase"}


def signature(type_: str) -> dict[str, Any]:
    """{param: default} of a type hf_zero builds (DeepSpeed's schedules, then torch's)."""
    return SCHEDULERS[type_] if type_ in SCHEDULERS else TORCH_SCHEDULERS[type_]


def check(spec: Any) -> None:
    """Validate a SchedulerSpec: its type, that its params are the type's, and their values."""
    if spec.type in TORCH_REFUSED:
        raise checks.fail(spec, "type", f"torch's {spec.type} cannot be built from a config file: "
                          f"{TORCH_REFUSED[spec.type]}; {_TRAINER_WAY}", value=spec.type, allowed=_allowed())
    if spec.type not in SCHEDULERS and spec.type not in TORCH_SCHEDULERS:
        names = [*SCHEDULERS, *TORCH_SCHEDULERS]
        by_case = {name.lower(): name for name in names}
        close = [by_case[spec.type.lower()]] if spec.type.lower() in by_case else \
            difflib.get_close_matches(spec.type, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise checks.fail(spec, "type", f"not a schedule DeepSpeed (or hf_zero) builds{hint}; for a transformers "
                          f"schedule, {_TRAINER_WAY}", value=spec.type, allowed=_allowed())
    if spec.type in TORCH_SCHEDULERS:
        _check_torch(spec)
        return
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


def _allowed() -> str:
    return ", ".join(SCHEDULERS) + " (DeepSpeed's); torch.optim.lr_scheduler's " + ", ".join(TORCH_SCHEDULERS)


def _check_torch(spec: Any) -> None:
    """A torch scheduler's params: names of its signature and the required ones present ("auto" is refused
    before, outside the keys resolve_config fills)."""
    signature = TORCH_SCHEDULERS[spec.type]
    for key, value in spec.params.items():
        if key not in signature:
            close = difflib.get_close_matches(key, list(signature), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise checks.fail(spec, f"params.{key}", f"not a parameter of torch's {spec.type} that a config may "
                              f"set{hint}", value=value, allowed=", ".join(signature))
    for key, default in signature.items():
        if default is REQUIRED and key not in spec.params:
            raise checks.fail(spec, f"params.{key}", f"torch's {spec.type} needs it (no default)", value=None,
                              allowed="a value")
    if spec.type == "OneCycleLR" and spec.params.get("total_steps") is None and not (
            spec.params.get("epochs") is not None and spec.params.get("steps_per_epoch") is not None):
        raise checks.fail(spec, "params.total_steps", "OneCycleLR needs total_steps, or epochs and steps_per_epoch",
                          value=None, allowed="an integer >= 1")


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
