"""Refuse a Trainer that is itself set up for DeepSpeed or FSDP while hf_zero is active.

DeepSpeed, FSDP and hf_zero each shard the model and wrap the optimizer; two of them on one
Trainer would shard twice (or one would silently win). The ``__init__`` seam asks ``refuse``
twice: before transformers' ``__init__`` about what the TrainingArguments and accelerate's
environment variables ask for, and after it about the plugins accelerate actually set up (an
``accelerate launch`` config with a deepspeed or fsdp section). ``hf_zero.run`` prints the
``ArgumentsMismatch`` once, as one line, and every rank exits 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hf_zero.config.errors import ArgumentsMismatch

_TRUE = ("1", "true", "yes", "y", "t", "on")
_OFF_WITH_HF_ZERO = "or run without hf_zero (no --zero_config / --deepspeed FILE, no hf_zero.trainer.activate)"


def refuse(args: Any, environ: Mapping[str, str], source: str, *, deepspeed_plugin: bool = False,
           fsdp_plugin: bool = False) -> None:
    """ArgumentsMismatch naming what sets up DeepSpeed or FSDP beside hf_zero (``source``: the zero config)."""
    problems = []
    deepspeed = getattr(args, "deepspeed", None)
    if deepspeed:
        shown = deepspeed if isinstance(deepspeed, str) else "a dict"
        problems.append(
            f"TrainingArguments.deepspeed = {shown!r} while hf_zero runs ZeRO from {source}: DeepSpeed and hf_zero "
            "would both shard the model; leave TrainingArguments.deepspeed unset and give the file to hf_zero "
            "instead (`hf-zero launch` and `python -m hf_zero.run` take --deepspeed FILE as the zero config; in "
            f"code: hf_zero.trainer.activate(FILE)), {_OFF_WITH_HF_ZERO}")
    fsdp = bool(getattr(args, "fsdp", None) or getattr(args, "fsdp_plugin_args", None))
    if fsdp:
        problems.append(
            f"TrainingArguments.fsdp = {getattr(args, 'fsdp', None)!r} while hf_zero runs ZeRO from {source}: FSDP "
            "and hf_zero would both shard the model; drop fsdp / fsdp_config (hf_zero's stage 3 shards like "
            f"FSDP's full_shard, stage 2 like shard_grad_op), {_OFF_WITH_HF_ZERO}")
    for name, variable, plugin, named in (("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", deepspeed_plugin, bool(deepspeed)),
                                          ("FSDP", "ACCELERATE_USE_FSDP", fsdp_plugin, fsdp)):
        if not named and (plugin or environ.get(variable, "").lower() in _TRUE):
            problems.append(
                f"accelerate is set up for {name} (its {name.lower()} plugin: `accelerate launch` with a config whose "
                f"distributed_type is {name.upper()}, or {variable}=true) while hf_zero runs ZeRO from {source}; start "
                f"the script with `hf-zero launch`, or with `accelerate launch` and a config without {name} "
                f"(distributed_type: MULTI_GPU) running `-m hf_zero.run`, {_OFF_WITH_HF_ZERO}")
    if problems:
        raise ArgumentsMismatch("\n".join(problems))
