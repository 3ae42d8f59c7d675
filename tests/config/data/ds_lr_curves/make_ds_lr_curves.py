"""Write ds_lr_curves.json: learning rates (and OneCycle's betas) per step from DeepSpeed's own code.

DeepSpeed cannot be imported on a CPU box without its ops, and hf_zero never imports it, so this
script reads the one file ``deepspeed/runtime/lr_schedules.py`` out of the DeepSpeed wheel, gives
it a stand-in for the only thing it imports from DeepSpeed (``deepspeed.utils.logger``), and runs
its classes on a real torch optimizer exactly as DeepSpeed's engine does: build, then one
``optimizer.step()`` and one ``scheduler.step()`` per training step. The value recorded for step k
is the one the k-th optimizer step runs with.

    python tests/config/data/ds_lr_curves/make_ds_lr_curves.py [path/to/deepspeed-*.whl]

(default: the wheel under ../shared/wheels/, relative to the repository root). The fixture also
records each class's constructor defaults, which tests/config/test_ds_lr_curves.py holds against
hf_zero/config/scheduler_block.py.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys
import types
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]
WHEEL = ROOT.parent / "shared" / "wheels" / "deepspeed-0.19.8" / "deepspeed-0.19.8-py3-none-any.whl"
MEMBER = "deepspeed/runtime/lr_schedules.py"
STEPS = 40

# (type, params, optimizer: torch class name and one lr per param group)
CASES = [
    ("WarmupLR", {}, ("AdamW", [1e-3])),
    ("WarmupLR", {"warmup_min_lr": 0, "warmup_max_lr": 5e-5, "warmup_num_steps": 1}, ("AdamW", [5e-5])),
    ("WarmupLR", {"warmup_min_lr": 0, "warmup_max_lr": 1e-2, "warmup_num_steps": 7}, ("AdamW", [1e-2])),
    ("WarmupLR", {"warmup_min_lr": 1e-5, "warmup_max_lr": 1e-3, "warmup_num_steps": 10, "warmup_type": "linear"},
     ("AdamW", [1e-3])),
    ("WarmupLR", {"warmup_num_steps": 5}, ("AdamW", [3e-4, 6e-4])),
    ("WarmupLR", {"warmup_min_lr": [0, 1e-4], "warmup_max_lr": [1e-3, 2e-3], "warmup_num_steps": 5},
     ("AdamW", [1e-3, 1e-3])),
    ("WarmupDecayLR", {"total_num_steps": 30, "warmup_num_steps": 5}, ("AdamW", [1e-3])),
    ("WarmupDecayLR", {"total_num_steps": 30, "warmup_min_lr": 1e-5, "warmup_max_lr": 3e-4, "warmup_num_steps": 8,
                       "warmup_type": "linear"}, ("AdamW", [3e-4])),
    ("WarmupDecayLR", {"total_num_steps": 3, "warmup_num_steps": 10}, ("AdamW", [1e-3])),
    ("WarmupDecayLR", {"total_num_steps": 20, "warmup_max_lr": 2e-3, "warmup_num_steps": 1}, ("SGD", [1e-3])),
    ("WarmupCosineLR", {"total_num_steps": 30, "warmup_num_steps": 5}, ("AdamW", [2e-3])),
    ("WarmupCosineLR", {"total_num_steps": 30, "warmup_min_ratio": 0.1, "warmup_num_steps": 6,
                        "cos_min_ratio": 0.05, "warmup_type": "linear"}, ("AdamW", [1e-3, 5e-4])),
    ("WarmupCosineLR", {"total_num_steps": 4, "warmup_num_steps": 8}, ("AdamW", [1e-3])),
    ("OneCycle", {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-2, "cycle_first_step_size": 10}, ("AdamW", [1e-3])),
    ("OneCycle", {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-2, "cycle_first_step_size": 6,
                  "cycle_second_step_size": 4, "cycle_first_stair_count": 3, "cycle_second_stair_count": 2,
                  "decay_step_size": 4, "decay_lr_rate": 0.5, "decay_mom_rate": 0.1, "cycle_min_mom": 0.85,
                  "cycle_max_mom": 0.95}, ("AdamW", [1e-3])),
    ("OneCycle", {"cycle_min_lr": [1e-4, 2e-4], "cycle_max_lr": [1e-3, 4e-3], "cycle_first_step_size": 7,
                  "decay_step_size": 3, "decay_lr_rate": 0.2, "cycle_momentum": False}, ("AdamW", [1e-3, 1e-3])),
    ("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-1, "cycle_first_step_size": 5}, ("SGD", [1e-2])),
    ("LRRangeTest", {}, ("AdamW", [1e-3])),
    ("LRRangeTest", {"lr_range_test_min_lr": 1e-4, "lr_range_test_step_size": 5, "lr_range_test_step_rate": 2.0},
     ("AdamW", [1e-3])),
    ("LRRangeTest", {"lr_range_test_min_lr": [1e-4, 1e-3], "lr_range_test_step_size": 3,
                     "lr_range_test_staircase": True}, ("SGD", [1e-3, 1e-3])),
]


def load_lr_schedules(wheel: Path) -> tuple[types.ModuleType, bytes]:
    """DeepSpeed's lr_schedules.py from the wheel, run with a stand-in ``deepspeed.utils``."""
    source = zipfile.ZipFile(wheel).read(MEMBER)
    utils = types.ModuleType("deepspeed.utils")
    utils.logger = logging.getLogger("deepspeed")
    for name, module in (("deepspeed", types.ModuleType("deepspeed")), ("deepspeed.utils", utils)):
        sys.modules.setdefault(name, module)
    module = types.ModuleType("deepspeed.runtime.lr_schedules")
    exec(compile(source, MEMBER, "exec"), module.__dict__)  # DeepSpeed's own file, from its wheel
    return module, source


def optimizer(name: str, lrs: list[float]) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return getattr(torch.optim, name)(groups, lr=lrs[0])


def curve(lr_schedules: types.ModuleType, type_: str, params: dict, opt_spec: tuple) -> dict:
    opt = optimizer(*opt_spec)
    scheduler = getattr(lr_schedules, type_)(opt, **params)
    lrs, betas = [], []
    for _ in range(STEPS):
        lrs.append([float(g["lr"]) for g in opt.param_groups])
        betas.append([list(g["betas"]) for g in opt.param_groups] if "betas" in opt.defaults else None)
        opt.step()
        scheduler.step()
    return {"type": type_, "params": params, "optimizer": {"type": opt_spec[0], "lrs": opt_spec[1]},
            "lr": lrs, "betas": betas if type_ == "OneCycle" else None}


def defaults(cls: type) -> dict:
    out = {}
    for name, p in list(inspect.signature(cls).parameters.items())[1:]:
        if name == "last_batch_iteration":
            continue
        out[name] = "REQUIRED" if p.default is p.empty else p.default
    return out


def main() -> None:
    wheel = Path(sys.argv[1]) if len(sys.argv) > 1 else WHEEL
    lr_schedules, source = load_lr_schedules(wheel)
    fixture = {
        "made_by": "tests/config/data/ds_lr_curves/make_ds_lr_curves.py",
        "deepspeed_file": f"{wheel.name}:{MEMBER}",
        "deepspeed_file_sha256": hashlib.sha256(source).hexdigest(),
        "steps": STEPS,
        "defaults": {name: defaults(getattr(lr_schedules, name)) for name in lr_schedules.VALID_LR_SCHEDULES},
        "cases": [curve(lr_schedules, *case) for case in CASES],
    }
    out = HERE / "ds_lr_curves.json"
    cases = ",\n".join("  " + json.dumps(case) for case in fixture.pop("cases"))  # one line per curve
    head = json.dumps(fixture, indent=1)[:-2]
    out.write_text(f'{head},\n "cases": [\n{cases}\n ]\n}}\n')
    print(f"wrote {out.relative_to(ROOT)}: {len(CASES)} curves of {STEPS} steps")


if __name__ == "__main__":
    main()
