"""accelerate's ``deepspeed_config`` section -> a zero config (DeepSpeed JSON, as hf_zero reads it).

accelerate 1.x (``utils/dataclasses.py``, ``DeepSpeedPlugin.__post_init__``) builds a DeepSpeed
config from these inline keys, each absent one taking accelerate's default (``zero_stage`` 2,
offload devices "none", ``zero3_init_flag`` true at stage 3), or takes ``deepspeed_config_file`` as
the config and refuses the inline keys beside it. The conversion does the same, then says per key
what it became (:data:`RULES`).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hf_zero.accelerate_config.conversion import AccelerateConfigError, Conversion, Note, Rule, unknown
from hf_zero.config.small_file import read_small_text

SECTION = "deepspeed_config"
DEVICES = ("none", "cpu", "nvme")
DEFAULT_STAGE = 2  # ACCELERATE_DEEPSPEED_ZERO_STAGE's default
LAUNCHERS = {"standard": "torchrun", "nossh": "torchrun", "pdsh": "ssh", "slurm": "slurm"}  # -> hf-zero launch's


def _key(name: str) -> str:
    return f"{SECTION}.{name}"


def _stage(conv: Conversion, key: str, value: Any, why: str = "") -> None:
    conv.stage = conv.integer(key, DEFAULT_STAGE if value is None else value, minimum=0)
    if conv.stage > 3:
        conv.refuse(key, value, "not a ZeRO stage; allowed: 0, 1, 2, 3")
    conv.mapped(key, value, "zero_optimization.stage", conv.stage, why)


def _optimizer_device(conv: Conversion, key: str, value: Any) -> None:
    device = conv.choice(key, value, DEVICES)
    if device != "none" and conv.stage == 0:
        conv.refuse(key, value, "optimizer offload needs ZeRO stage 1, 2 or 3 (zero_stage is 0)")
    conv.mapped(key, value, "zero_optimization.offload_optimizer.device", device)


def _param_device(conv: Conversion, key: str, value: Any) -> None:
    device = conv.choice(key, value, DEVICES)
    if device == "none":
        conv.not_needed(key, value, "no parameter offload (the default)")
    elif conv.stage != 3:
        conv.not_needed(key, value, f"parameter offload is a stage-3 feature; DeepSpeed ignores it at stage "
                                    f"{conv.stage}, and so does the zero config (left out)")
    elif conv.get("zero_optimization.offload_optimizer.device", "none") == "none":
        conv.refuse(key, value, "parameter offload needs optimizer offload in hf_zero (the fp32 masters would "
                                'stay on the GPU); set offload_optimizer_device to "cpu" or "nvme" too')
    else:
        conv.mapped(key, value, "zero_optimization.offload_param.device", device)


def _nvme_path(kind: str):
    def convert(conv: Conversion, key: str, value: Any) -> None:
        if conv.get(f"zero_optimization.{kind}.device") != "nvme":
            conv.not_needed(key, value, f"used only when {kind}_device is \"nvme\" (accelerate drops it too)")
        elif not isinstance(value, str) or value in ("", "none"):
            conv.refuse(key, value, f'{kind}_device is "nvme", which needs a directory; allowed: a directory path')
        else:
            conv.mapped(key, value, f"zero_optimization.{kind}.nvme_path", value)
    return convert


def _count_or_auto(path: str, flag: str, number: type):
    def convert(conv: Conversion, key: str, value: Any) -> None:
        if value == "auto":
            conv.mapped(key, value, path, "auto", f"filled from the script's {flag}")
            return
        try:
            written = number(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            written = None
        if written is None or written < (1 if number is int else 0):
            conv.refuse(key, value, f'not a {"positive integer" if number is int else "number >= 0"} or "auto"')
        conv.mapped(key, value, path, written, f"must equal the script's {flag}, or the run stops at the start")
    return convert


def _init_flag(conv: Conversion, key: str, value: Any) -> None:
    flag = conv.boolean(key, value)
    if conv.stage != 3:
        conv.not_needed(key, value, "a stage-3 setting; accelerate turns it off at other stages")
    else:
        conv.mapped(key, value, "zero_optimization.zero3_init_flag", flag,
                    "the script's from_pretrained of a local checkpoint loads sharded" if flag else "")


def _save_16bit(conv: Conversion, key: str, value: Any) -> None:
    flag = conv.boolean(key, value)
    conv.not_needed(key, value, "hf_zero's stage-3 save_model always writes the full weights, streamed unit by unit"
                    + ("" if flag else " (DeepSpeed with false would write no model weights)"))


def _launcher(conv: Conversion, key: str, value: Any) -> None:
    name = conv.choice(key, value, ("pdsh", "standard", "openmpi", "mvapich", "mpich", "nossh", "slurm"))
    if name in LAUNCHERS:
        conv.not_needed(key, value, f"a launcher choice: hf-zero launch --launcher {LAUNCHERS[name]}",
                        launch=["--launcher", LAUNCHERS[name]])
    else:
        conv.not_needed(key, value, "hf-zero launch starts ranks with torchrun, over ssh or with srun, not MPI; "
                                    "use --launcher ssh (with --hostfile) or --launcher slurm")


def _launch_flag(flag: str):
    def convert(conv: Conversion, key: str, value: Any) -> None:
        conv.not_needed(key, value, f"a launcher flag: hf-zero launch {flag} {value}", launch=[flag, str(value)])
    return convert


def _moe(conv: Conversion, key: str, value: Any) -> None:
    conv.not_needed(key, value, "hf_zero gathers whole _no_split_modules blocks at stage 3, so a block's experts "
                                "are never fetched one by one (what DeepSpeed's leaf modules are for)")


def _config_file(conv: Conversion, key: str, value: Any) -> None:
    raise AssertionError("deepspeed_config_file is read by convert(), before the rules")


RULES: dict[str, Rule] = {
    "deepspeed_config_file": Rule(
        "the zero config is that file's JSON, copied as it is (hf_zero reads DeepSpeed files); the inline keys "
        "below are refused beside it, as accelerate refuses them", _config_file),
    "zero_stage": Rule("`zero_optimization.stage` (absent: 2, accelerate's default)", _stage),
    "offload_optimizer_device": Rule("`zero_optimization.offload_optimizer.device`", _optimizer_device),
    "offload_optimizer_nvme_path": Rule("`zero_optimization.offload_optimizer.nvme_path` with device \"nvme\"; "
                                        "else not needed", _nvme_path("offload_optimizer")),
    "offload_param_device": Rule("`zero_optimization.offload_param.device` at stage 3 (refused without optimizer "
                                 "offload, which hf_zero requires with it); not needed below stage 3, where DeepSpeed "
                                 "ignores it", _param_device),
    "offload_param_nvme_path": Rule("`zero_optimization.offload_param.nvme_path` with device \"nvme\"; else not "
                                    "needed", _nvme_path("offload_param")),
    "gradient_accumulation_steps": Rule("`gradient_accumulation_steps` (a number must equal the script's "
                                        "`--gradient_accumulation_steps`)",
                                        _count_or_auto("gradient_accumulation_steps",
                                                       "--gradient_accumulation_steps", int)),
    "gradient_clipping": Rule("`gradient_clipping` (a number must equal the script's `--max_grad_norm`)",
                              _count_or_auto("gradient_clipping", "--max_grad_norm", float)),
    "zero3_init_flag": Rule("`zero_optimization.zero3_init_flag` at stage 3 (absent: true, accelerate's default "
                            "there): the script's `from_pretrained` of a local checkpoint loads sharded; not needed "
                            "below stage 3", _init_flag),
    "zero3_save_16bit_model": Rule("not needed: a stage-3 `save_model` always writes the full weights, streamed",
                                   _save_16bit),
    "deepspeed_moe_layer_cls_names": Rule("not needed: stage-3 units are whole blocks, experts included", _moe),
    "deepspeed_multinode_launcher": Rule("not needed: `hf-zero launch --launcher` (pdsh: ssh, standard/nossh: "
                                         "torchrun, slurm: slurm; no MPI launchers)", _launcher),
    "deepspeed_hostfile": Rule("not needed: `hf-zero launch --hostfile`", _launch_flag("--hostfile")),
    "deepspeed_exclusion_filter": Rule("not needed: `hf-zero launch --exclude`", _launch_flag("--exclude")),
    "deepspeed_inclusion_filter": Rule("not needed: `hf-zero launch --include`", _launch_flag("--include")),
}
"""Every key of accelerate's deepspeed_config section, in the order they are converted."""

_INLINE = ("zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
           "offload_param_nvme_path", "gradient_accumulation_steps", "gradient_clipping", "zero3_save_16bit_model")
"""Keys accelerate refuses beside deepspeed_config_file (they belong in that file)."""


def convert(conv: Conversion, section: dict[str, Any]) -> None:
    """Fill ``conv`` from the ``deepspeed_config`` section (a mapping, checked by the caller)."""
    for name, value in section.items():
        if name not in RULES:
            unknown(conv, _key(str(name)), value, [_key(k) for k in RULES])
    if "deepspeed_config_file" in section:
        _read_file(conv, section)
    elif "zero_stage" not in section:
        _stage(conv, _key("zero_stage"), None, why=f"absent: accelerate's default {DEFAULT_STAGE}")
    for name, rule in RULES.items():
        if name in section and name != "deepspeed_config_file":
            rule.convert(conv, _key(name), section[name])
    for kind in ("offload_optimizer", "offload_param"):
        if conv.get(f"zero_optimization.{kind}.device") == "nvme" and conv.get(f"zero_optimization.{kind}.nvme_path") \
                is None and "deepspeed_config_file" not in section:
            conv.refuse(_key(f"{kind}_nvme_path"), None, f'{kind}_device is "nvme", which needs a directory; '
                                                         "allowed: a directory path")
    if "zero3_init_flag" not in section and conv.stage == 3 and conv.get("zero_optimization.zero3_init_flag") is None:
        conv.mapped(_key("zero3_init_flag"), None, "zero_optimization.zero3_init_flag", True,
                    "absent: accelerate's default at stage 3")


def _read_file(conv: Conversion, section: dict[str, Any]) -> None:
    key, path = _key("deepspeed_config_file"), section["deepspeed_config_file"]
    beside = [name for name in _INLINE if name in section]
    if beside:
        conv.refuse(_key(beside[0]), section[beside[0]],
                    f"accelerate refuses it beside {key}; write it in {path} instead")
    if not isinstance(path, str) or not path:
        conv.refuse(key, path, "not a file path")
    text = read_small_text(path, what=f"{key} (a relative path is taken from the current directory, as accelerate "
                                      "does)", error=AccelerateConfigError)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        conv.refuse(key, path, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}")
    if not isinstance(raw, dict) or "zero_optimization" not in raw:
        conv.refuse(key, path, "not a DeepSpeed config with a zero_optimization block (accelerate refuses it too)")
    conv.config = copy.deepcopy(raw)
    stage = raw["zero_optimization"].get("stage", 0) if isinstance(raw["zero_optimization"], dict) else 0
    conv.stage = stage if isinstance(stage, int) and not isinstance(stage, bool) else None
    conv.notes.append(Note("mapped", key, path, "the zero config is this file's JSON, as written"))
