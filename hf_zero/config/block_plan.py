"""What the ``optimizer`` and ``scheduler`` blocks build, and where each value comes from.

A :class:`BlockPlan` lists every argument the torch constructor gets with its source: written in
the file, ``"auto"`` (filled from TrainingArguments: ``resolve.AUTO_SOURCES`` says from what), or
DeepSpeed's default for a key the block leaves out. The Trainer builds from it and logs
:meth:`BlockPlan.describe` (``hf_zero/trainer/config_blocks.py``); ``hf-zero doctor`` shows the
same line before anything runs, with "auto" values not yet filled.

    optimizer torch.optim.AdamW (optimizer.type "AdamW" in z.json): lr=5e-05 ("auto":
    TrainingArguments.learning_rate), betas=[0.9, 0.999] ("auto": ...), ...; one param group ...
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hf_zero.config import optimizer_block, scheduler_block
from hf_zero.config.auto import AUTO
from hf_zero.config.errors import show
from hf_zero.config.resolve import AUTO_SOURCES

WRITTEN = "config"
DEEPSPEED_DEFAULT = "DeepSpeed's default"
_AUTO = '"auto": '
_AUTO_FROM = dict(AUTO_SOURCES)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One constructor argument: its value (AUTO while not yet filled) and where it comes from."""

    value: Any
    source: str


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """What one block builds: ``runs`` (a torch.optim class or a DeepSpeed schedule), its arguments."""

    block: str  # "optimizer" or "scheduler"
    written: str  # the block's type, as the file spells it
    runs: str  # torch.optim class name / ds_schedulers class name
    settings: dict[str, Setting]
    notes: tuple[str, ...] = ()

    def kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments (every "auto" must have been filled)."""
        if any(s.value is AUTO for s in self.settings.values()):
            raise AssertionError(f"{self.block} built before its \"auto\" values were filled: {self.settings}")
        return {k: (tuple(s.value) if k == "betas" else s.value) for k, s in self.settings.items()}

    def describe(self, source: str | None) -> str:
        """One line: what runs, each argument with its source, and the notes."""
        where = f" in {source}" if source else ""
        what = (f"torch.optim.{self.runs}" if self.block == "optimizer" else self.runs
                if self.runs.startswith("torch.") else f"{self.runs} (DeepSpeed's formula)")
        args = ", ".join(_arg(k, s) for k, s in self.settings.items()) or "no arguments"
        notes = "".join(f"; {n}" for n in self.notes)
        return f"{self.block} {what} from {self.block}.type {show(self.written)}{where}: {args}{notes}"


_NONE_MEANS = {"warmup_max_lr": "the optimizer's lr", "cycle_second_step_size": "cycle_first_step_size",
               "cycle_second_stair_count": "cycle_first_stair_count"}  # DeepSpeed's reading of null


def _arg(key: str, setting: Setting) -> str:
    if setting.value is AUTO:  # doctor, or scheduler step counts before train(): not filled yet
        return f'{key}="auto" ({setting.source.removeprefix(_AUTO)}, filled when the Trainer starts)'
    return f"{key}={_show(key, setting.value)} ({setting.source})"


def _show(key: str, value: Any) -> str:
    return _NONE_MEANS.get(key, "null") if value is None else show(value)


def _source(key: str, loaded: dict[str, Any], block: str) -> str:
    if key not in loaded:
        return DEEPSPEED_DEFAULT
    if loaded[key] is AUTO:
        return _AUTO + _AUTO_FROM[f"{block}.params.{key}"]
    return WRITTEN


def optimizer_plan(loaded: Any, resolved: Any = None) -> BlockPlan:
    """The plan for an OptimizerSpec as read (``loaded``) and, once known, as resolved."""
    params = (resolved or loaded).params
    runs = optimizer_block.torch_class(loaded.type, params)
    settings: dict[str, Setting] = {}
    notes = []
    if optimizer_block.is_adam(optimizer_block.canonical_type(loaded.type)):
        for key, default in optimizer_block.ADAM_DEFAULTS.items():
            settings[key] = Setting(params.get(key, default), _source(key, loaded.params, "optimizer"))
        settings.update({k: Setting(v, WRITTEN) for k, v in params.items()
                         if k not in settings and k not in optimizer_block.ADAM_SWITCHES})
        if runs == "Adam":
            notes.append("adam_w_mode false: Adam's L2 weight decay, as DeepSpeed")
        ignored = [k for k in ("torch_adam", "set_grad_none") if k in params]
        if ignored:
            notes.append(f"{', '.join(ignored)}: no effect (hf_zero always runs torch's Adam)")
    else:
        settings = {k: Setting(v, _source(k, loaded.params, "optimizer")) for k, v in params.items()}
        notes.append(f"other arguments: torch.optim.{runs}'s defaults")
    notes.append("every trainable parameter in one group, weight_decay on all of them (as DeepSpeed)")
    return BlockPlan("optimizer", loaded.type, runs, settings, tuple(notes))


def scheduler_plan(loaded: Any, resolved: Any = None) -> BlockPlan:
    """The plan for a SchedulerSpec as read (``loaded``) and, once known, as resolved."""
    params = (resolved or loaded).params
    if loaded.type in scheduler_block.TORCH_SCHEDULERS:  # written params only; torch's defaults for the rest
        settings = {k: Setting(v, WRITTEN) for k, v in params.items()}
        return BlockPlan("scheduler", loaded.type, f"torch.optim.lr_scheduler.{loaded.type}", settings,
                         ("other arguments: torch's defaults; stepped once per optimizer step, as DeepSpeed steps it",))
    settings = {}
    for key, default in scheduler_block.SCHEDULERS[loaded.type].items():
        value = params.get(key, default)
        settings[key] = Setting(value, _source(key, loaded.params, "scheduler"))
    notes = []
    if settings.get("warmup_num_steps") is not None and settings["warmup_num_steps"].value is not AUTO \
            and settings["warmup_num_steps"].value < 2:
        notes.append("a warmup shorter than 2 steps runs as 2 (DeepSpeed's rule)")
    return BlockPlan("scheduler", loaded.type, loaded.type, settings, tuple(notes))
