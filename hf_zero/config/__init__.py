"""hf_zero configuration: load a DeepSpeed or hf_zero JSON file, resolve "auto", validate.

Typical use::

    config = load_config("zero2.json")                    # validated, "auto" kept
    config = resolve_config(config, training_args, world_size=8, hidden_size=4096)

Module map: ``auto`` (the AUTO sentinel), ``errors`` (ConfigError), ``checks`` (field
validators), ``fields`` (documented fields), ``zero``/``precision``/``schema`` (the
dataclasses), ``not_applied`` (DeepSpeed keys accepted but ignored), ``deepspeed`` and
``native`` (the two file formats), ``loader`` (load_config), ``resolve`` (resolve_config),
``docs`` (generates docs/configuration.md).
"""

from hf_zero.config.auto import AUTO
from hf_zero.config.errors import ConfigError
from hf_zero.config.loader import load_config
from hf_zero.config.native import config_to_dict
from hf_zero.config.not_applied import NOT_APPLIED
from hf_zero.config.precision import PrecisionConfig
from hf_zero.config.resolve import resolve_config
from hf_zero.config.schema import HfZeroConfig, OptimizerSpec, SchedulerSpec
from hf_zero.config.zero import OffloadConfig, ZeroConfig

__all__ = [
    "AUTO",
    "NOT_APPLIED",
    "ConfigError",
    "HfZeroConfig",
    "OffloadConfig",
    "OptimizerSpec",
    "PrecisionConfig",
    "SchedulerSpec",
    "ZeroConfig",
    "config_to_dict",
    "load_config",
    "resolve_config",
]
