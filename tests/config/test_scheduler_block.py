"""A scheduler block naming a torch.optim.lr_scheduler class builds it, as DeepSpeed's _scheduler_from_config
does (its own five schedules first, then torch's, params as written); the ones a JSON file cannot describe are
refused when the file is read, saying how to get a transformers schedule instead."""

from __future__ import annotations

import inspect

import pytest
import torch

from hf_zero.config import ConfigError
from hf_zero.config.block_plan import scheduler_plan
from hf_zero.config.scheduler_block import REQUIRED, TORCH_REFUSED, TORCH_SCHEDULERS
from hf_zero.trainer.ds_schedulers import build_scheduler

from .helpers import load_quiet

_NOT_FROM_JSON = {"optimizer", "last_epoch", "scale_fn"}


@pytest.mark.parametrize("name", sorted(TORCH_SCHEDULERS))
def test_table_is_torchs_signature(name):
    params = list(inspect.signature(getattr(torch.optim.lr_scheduler, name).__init__).parameters.values())[1:]
    torch_defaults = {p.name: (REQUIRED if p.default is inspect.Parameter.empty else p.default)
                      for p in params if p.name not in _NOT_FROM_JSON}
    assert TORCH_SCHEDULERS[name] == torch_defaults


def test_every_torch_scheduler_is_built_or_refused():
    classes = {n for n in dir(torch.optim.lr_scheduler) if n[0].isupper() and n != "LRScheduler"
               and isinstance(getattr(torch.optim.lr_scheduler, n), type)
               and issubclass(getattr(torch.optim.lr_scheduler, n), (torch.optim.lr_scheduler.LRScheduler,
                                                                      torch.optim.lr_scheduler.ReduceLROnPlateau))}
    assert classes == set(TORCH_SCHEDULERS) | set(TORCH_REFUSED)


def lrs(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(("type_", "params"), [
    ("StepLR", {"step_size": 3, "gamma": 0.5}),
    ("CosineAnnealingLR", {"T_max": 10, "eta_min": 1e-5}),
    ("LinearLR", {"start_factor": 0.1, "total_iters": 4}),
    ("OneCycleLR", {"max_lr": 0.01, "total_steps": 12}),
])
def test_block_builds_torchs_scheduler_with_the_written_params(type_, params):
    config = load_quiet({"zero_optimization": {"stage": 2}, "scheduler": {"type": type_, "params": params}},
                        source="z.json")
    plan = scheduler_plan(config.scheduler)
    assert plan.runs == f"torch.optim.lr_scheduler.{type_}"
    assert plan.describe("z.json").startswith(f'scheduler torch.optim.lr_scheduler.{type_} from scheduler.type '
                                              f'"{type_}" in z.json: ')
    ours = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    built = build_scheduler(plan.runs, ours, plan.kwargs())
    assert type(built) is getattr(torch.optim.lr_scheduler, type_)
    assert lrs(built, ours, 12) == lrs(getattr(torch.optim.lr_scheduler, type_)(theirs, **params), theirs, 12)


@pytest.mark.parametrize(("block", "key", "text"), [
    ({"type": "LambdaLR", "params": {}}, "scheduler.type", "lr_lambda is a Python function"),
    ({"type": "SequentialLR"}, "scheduler.type", "--lr_scheduler_type"),
    ({"type": "linear"}, "scheduler.type", "for a transformers schedule, leave the scheduler block out"),
    ({"type": "StepLR", "params": {"step_size": "auto"}}, "scheduler.params.step_size", '"auto" cannot be filled in for this key'),
    ({"type": "StepLR", "params": {"step_size": 2, "last_epoch": 3}}, "scheduler.params.last_epoch",
     "not a parameter of torch's StepLR"),
    ({"type": "OneCycleLR", "params": {"max_lr": 0.1}}, "scheduler.params.total_steps", "epochs and steps_per_epoch"),
])
def test_refused_torch_blocks_name_the_key(block, key, text):
    with pytest.raises(ConfigError) as caught:
        load_quiet({"zero_optimization": {"stage": 2}, "scheduler": block}, source="z.json")
    assert str(caught.value).startswith(f"{key} = ") and text in str(caught.value)
