"""PrecisionConfig: compute dtype and fp16 dynamic loss scaling."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hf_zero.config import checks
from hf_zero.config.auto import AUTO, Auto
from hf_zero.config.fields import setting

DTYPES = ("fp32", "bf16", "fp16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    """Training dtype (DeepSpeed's ``bf16``/``fp16`` blocks) and the fp16 loss scaler.

    DeepSpeed spells the dtype as two switches, ``bf16.enabled`` and ``fp16.enabled``;
    here it is one field so that "both on" cannot be represented.
    """

    dtype: Literal["fp32", "bf16", "fp16"] | Auto = setting(
        AUTO,
        deepspeed="bf16.enabled / fp16.enabled",
        doc="""Dtype of the model's parameters and activations during training; fp32 master
        weights are kept for the optimizer whenever this is bf16 or fp16. "auto" (the
        default, also when a DeepSpeed file has neither switch): bf16 if
        TrainingArguments.bf16, fp16 if TrainingArguments.fp16, else fp32, so the Trainer's
        flags decide unless the file says otherwise.""",
    )
    loss_scale: float = setting(
        0.0,
        deepspeed="fp16.loss_scale",
        doc="""fp16 only: fixed loss scale, or 0 for dynamic loss scaling. Default 0
        (DeepSpeed's): dynamic scaling adapts to the model.""",
    )
    initial_scale_power: int = setting(
        16,
        deepspeed="fp16.initial_scale_power",
        doc="""fp16 dynamic scaling starts at 2**initial_scale_power. Default 16 (DeepSpeed's):
        high enough to avoid underflow, lowered quickly on overflow.""",
    )
    loss_scale_window: int = setting(
        1000,
        deepspeed="fp16.loss_scale_window",
        doc="""fp16: steps without overflow before the dynamic scale is doubled. Default 1000
        (DeepSpeed's).""",
    )
    hysteresis: int = setting(
        2,
        deepspeed="fp16.hysteresis",
        doc="""fp16: overflows tolerated before the dynamic scale is halved. Default 2
        (DeepSpeed's).""",
    )
    min_loss_scale: float = setting(
        1.0,
        deepspeed="fp16.min_loss_scale",
        doc="""fp16: the dynamic scale never drops below this. Default 1 (DeepSpeed's).""",
    )

    def __post_init__(self) -> None:
        checks.choice(self, "dtype", DTYPES, auto=True)
        checks.number(self, "loss_scale", minimum=0.0)
        checks.integer(self, "initial_scale_power", minimum=0, maximum=64)
        checks.integer(self, "loss_scale_window", minimum=1)
        checks.integer(self, "hysteresis", minimum=1)
        checks.number(self, "min_loss_scale", minimum=0.0, min_open=True)
