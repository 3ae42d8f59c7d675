"""accelerate's ``fsdp_config`` section -> a zero config (DeepSpeed JSON, as hf_zero reads it).

FSDP and ZeRO shard the same three things; what differs is when parameters are whole:

| FSDP (accelerate)                                   | ZeRO stage | params between steps                |
|-----------------------------------------------------|------------|-------------------------------------|
| FULL_SHARD, or FSDP2 ``reshard_after_forward: true`` | 3          | 1/W on each rank (both)             |
| SHARD_GRAD_OP, or FSDP2 ``reshard_after_forward: false`` | 2      | FSDP: 1/W; ZeRO-2: whole on every rank |
| NO_SHARD                                             | 0          | whole (plain data parallel)         |
| HYBRID_SHARD, HYBRID_SHARD_ZERO2                     | refused    | sharded within a node, replicated across nodes |

So SHARD_GRAD_OP becomes stage 2, which keeps the full params on every rank (p bytes per element
instead of p/W); the note says so. Keys are read with or without their ``fsdp_`` prefix, as
accelerate reads them (``commands/launch.py``). Absent keys take accelerate's defaults
(``fsdp_version`` 1, FULL_SHARD / ``reshard_after_forward`` true).
"""

from __future__ import annotations

from typing import Any

from hf_zero.accelerate_config.conversion import Conversion, Rule, unknown

SECTION = "fsdp_config"
STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")  # FSDP's 1-5
STAGES = {"FULL_SHARD": 3, "SHARD_GRAD_OP": 2, "NO_SHARD": 0}
_STAGE_NOTES = {
    3: "parameters, gradients and optimizer state sharded",
    2: "gradients and optimizer state sharded; unlike FSDP, the full params stay on every rank between steps "
       "(use FULL_SHARD, stage 3, if they do not fit)",
    0: "plain data parallel: hf_zero's stage 0 is the Trainer's own DDP",
}


def _key(name: str) -> str:
    return f"{SECTION}.{name}"


def _strategy(conv: Conversion, key: str, value: Any) -> str:
    """A sharding strategy as accelerate accepts it: its name (any case) or FSDP's number 1-5."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= len(STRATEGIES):
        return STRATEGIES[value - 1]
    if isinstance(value, str) and value.strip().isdigit() and 1 <= int(value) <= len(STRATEGIES):
        return STRATEGIES[int(value) - 1]
    return conv.choice(key, value, STRATEGIES)


def _set_stage(conv: Conversion, key: str, value: Any, strategy: str, why: str = "") -> None:
    if strategy not in STAGES:
        conv.refuse(key, value, "hybrid sharding (sharded within a node, replicated across nodes) is not implemented "
                                "in hf_zero; use FULL_SHARD (stage 3) or SHARD_GRAD_OP (stage 2) over all ranks")
    conv.stage = STAGES[strategy]
    conv.mapped(key, value, "zero_optimization.stage", conv.stage,
                f"{strategy}: {_STAGE_NOTES[conv.stage]}" + (f"; {why}" if why else ""))


def _sharding(conv: Conversion, section: dict[str, Any], version: int) -> None:
    """The stage, from fsdp_sharding_strategy or fsdp_reshard_after_forward (accelerate's defaults if absent)."""
    for name in ("fsdp_sharding_strategy", "fsdp_reshard_after_forward"):
        if name not in section:
            continue
        value = section[name]
        if name == "fsdp_reshard_after_forward" and (isinstance(value, bool) or version == 2):
            flag = conv.boolean(_key(name), value)
            _set_stage(conv, _key(name), value, "FULL_SHARD" if flag else "SHARD_GRAD_OP",
                       "FSDP2 resharding after forward is FULL_SHARD" if flag else "no resharding is SHARD_GRAD_OP")
        else:
            _set_stage(conv, _key(name), value, _strategy(conv, _key(name), value))
        if name == "fsdp_sharding_strategy" and "fsdp_reshard_after_forward" in section:
            conv.not_needed(_key("fsdp_reshard_after_forward"), section["fsdp_reshard_after_forward"],
                            "fsdp_sharding_strategy decides the stage")
        return
    _set_stage(conv, _key("fsdp_reshard_after_forward"), None, "FULL_SHARD", "absent: accelerate's default")


def _version(conv: Conversion, key: str, value: Any) -> None:
    conv.not_needed(key, value, "hf_zero has one implementation; the version only says how "
                                "fsdp_reshard_after_forward reads (FSDP2: a boolean)")


def _already(conv: Conversion, key: str, value: Any) -> None:
    """The sharding keys: converted first, by _sharding."""


def _offload(conv: Conversion, key: str, value: Any) -> None:
    if not conv.boolean(key, value):
        conv.not_needed(key, value, "no offload (the default)")
    elif conv.stage == 0:
        conv.refuse(key, value, "offload needs a sharded strategy (NO_SHARD is plain data parallel, stage 0); use "
                                "SHARD_GRAD_OP or FULL_SHARD with it")
    elif conv.stage == 3:
        conv.put("zero_optimization.offload_optimizer", {"device": "cpu", "pin_memory": True})
        conv.mapped(key, value, "zero_optimization.offload_param", {"device": "cpu", "pin_memory": True},
                    "and offload_optimizer the same: FSDP's CPU offload holds the param shards, gradients and the "
                    "optimizer step on the host, pinned")
    else:
        conv.mapped(key, value, "zero_optimization.offload_optimizer", {"device": "cpu", "pin_memory": True},
                    "gradients, fp32 masters and the optimizer step on the host; at stage 2 the params stay on the GPU")


def _ram_efficient(conv: Conversion, key: str, value: Any) -> None:
    flag = conv.boolean(key, value)
    tp = conv.get("tensor_parallel.autotp_size", 1)  # parallelism_config is converted before this section
    if conv.stage != 3:
        conv.not_needed(key, value, "the model loads whole on every rank")
    elif flag and tp > 1:  # the table's 'tensor-parallel-sharded-load' row, said at the key the file has
        conv.refuse(key, value, f"with parallelism_config tp_size = {tp}: a sharded load (zero3_init_flag) cannot "
                                "be split for tensor parallelism in hf_zero (not built yet); set it to false: every "
                                "rank loads the whole model, which the Trainer splits, then shards")
    else:  # hf_zero's default at stage 3 is true: false is written out
        conv.mapped(key, value, "zero_optimization.zero3_init_flag", flag,
                    "the script's from_pretrained of a local checkpoint loads sharded: each rank reads only its slices"
                    if flag else "every rank loads the whole model, sharded when the optimizer is created")


def _note(text: str, script: tuple[str, ...] = ()):
    def convert(conv: Conversion, key: str, value: Any) -> None:
        conv.not_needed(key, value, text, script=script)
    return convert


def _choice_note(allowed: tuple[str, ...], text: str):
    def convert(conv: Conversion, key: str, value: Any) -> None:
        conv.choice(key, value, allowed)
        conv.not_needed(key, value, text)
    return convert


def _bool_note(text: str):
    def convert(conv: Conversion, key: str, value: Any) -> None:
        conv.boolean(key, value)
        conv.not_needed(key, value, text)
    return convert


def _backward_prefetch(conv: Conversion, key: str, value: Any) -> None:
    mode = conv.choice(key, value, ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"))
    if mode == "NO_PREFETCH" and conv.stage == 3:
        conv.mapped(key, value, "zero_optimization.stage3_prefetch_bucket_size", 0,
                    "no prefetch, in forward either (hf_zero has one switch for both)")
    else:
        conv.not_needed(key, value, "hf_zero prefetches the next units in the reverse of the forward's order, up to "
                                    "stage3_prefetch_bucket_size elements")


def _checkpointing(conv: Conversion, key: str, value: Any) -> None:
    if conv.boolean(key, value):
        conv.not_needed(key, value, "the script's --gradient_checkpointing (TrainingArguments)",
                        script=("--gradient_checkpointing",))
    else:
        conv.not_needed(key, value, "off")


def _checkpointing_offload(conv: Conversion, key: str, value: Any) -> None:
    """accelerate's ``offload_wrapper`` (``save_on_cpu`` around each layer's checkpoint) is hf_zero's CPU
    checkpointing: each checkpointed layer's input in pinned host memory until its recompute."""
    if not conv.boolean(key, value):
        conv.not_needed(key, value, "off")
        return
    if "--gradient_checkpointing" not in conv.script_flags:  # fsdp_activation_checkpointing (converted before) is off
        conv.refuse(key, value, f"needs {_key('fsdp_activation_checkpointing')}: true (accelerate refuses it without "
                                "too): only checkpointed layers' inputs are offloaded")
    conv.mapped(key, value, "activation_checkpointing.cpu_checkpointing", True,
                "each checkpointed layer's input in pinned host memory from forward until its recompute in backward, "
                "as accelerate's offload_wrapper; with the script's --gradient_checkpointing")


def _ignored_modules(conv: Conversion, key: str, value: Any) -> None:
    if value in (None, "", []):
        conv.not_needed(key, value, "none ignored")
    else:
        conv.refuse(key, value, "hf_zero shards every parameter of the model at stage 3; modules cannot be left out "
                                "(freeze them instead: frozen parameters are sharded in their own dtype)")


RULES: dict[str, Rule] = {
    "fsdp_version": Rule("not needed (1 or 2: only says how `fsdp_reshard_after_forward` reads)", _version),
    "fsdp_sharding_strategy": Rule("`zero_optimization.stage`: FULL_SHARD 3, SHARD_GRAD_OP 2 (the full params then "
                                   "stay on every rank), NO_SHARD 0; HYBRID_SHARD and HYBRID_SHARD_ZERO2 refused "
                                   "(no hybrid sharding)", _already),
    "fsdp_reshard_after_forward": Rule("`zero_optimization.stage` as above (FSDP1: a strategy name); FSDP2: true 3, "
                                       "false 2 (absent: FULL_SHARD, stage 3)", _already),
    "fsdp_offload_params": Rule("true: `offload_optimizer` and, at stage 3, `offload_param` on the CPU, pinned; "
                                "refused with NO_SHARD", _offload),
    "fsdp_cpu_ram_efficient_loading": Rule("at stage 3: `zero_optimization.zero3_init_flag` (true: sharded load of "
                                           "the script's local checkpoint, hf_zero's default there; false: whole; "
                                           "true refused with tp_size > 1); else not needed", _ram_efficient),
    "fsdp_sync_module_states": Rule("not needed: every rank loads the same checkpoint; a sharded load or "
                                    "`hf_zero.init.from_config` draws from one seed",
                                    _bool_note("every rank loads the same weights (a sharded load reads slices of "
                                               "one checkpoint; from_config draws from one broadcast seed)")),
    "fsdp_auto_wrap_policy": Rule("not needed: stage-3 units are the model's `_no_split_modules` blocks (the "
                                  "TRANSFORMER_BASED_WRAP of transformers' models)",
                                  _choice_note(("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"),
                                               "stage-3 units are the model's _no_split_modules blocks plus the root, "
                                               "whatever the policy")),
    "fsdp_transformer_layer_cls_to_wrap": Rule("not needed: the model's `_no_split_modules` classes are the units",
                                               _note("the units are the model's _no_split_modules classes")),
    "fsdp_min_num_params": Rule("not needed: units are blocks, not sized by parameter count",
                                _note("units are blocks, not sized by parameter count")),
    "fsdp_backward_prefetch": Rule("not needed (prefetch in reverse forward order); NO_PREFETCH at stage 3: "
                                   "`zero_optimization.stage3_prefetch_bucket_size` 0", _backward_prefetch),
    "fsdp_forward_prefetch": Rule("not needed: forward prefetch is always on, bounded by "
                                  "`stage3_prefetch_bucket_size`",
                                  _bool_note("hf_zero prefetches in forward too, up to stage3_prefetch_bucket_size "
                                             "elements (0 turns it off)")),
    "fsdp_state_dict_type": Rule("not needed: `save_model` writes full HF weights at every stage; checkpoints add "
                                 "each rank's part (`hf_zero_sharded/`), resumable at any world size",
                                 _choice_note(("FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT"),
                                              "save_model writes full HF weights (streamed at stage 3); checkpoints "
                                              "hold each rank's part too, resumable at any world size and stage")),
    "fsdp_use_orig_params": Rule("not needed: the model keeps its own parameters",
                                 _bool_note("the model keeps its own parameters; optimizers are given shard pieces")),
    "fsdp_activation_checkpointing": Rule("not needed: the script's `--gradient_checkpointing`", _checkpointing),
    "fsdp_activation_checkpointing_offload": Rule("true: `activation_checkpointing.cpu_checkpointing` (each "
                                                  "checkpointed layer's input on the host until its recompute); "
                                                  "refused without `fsdp_activation_checkpointing`", _checkpointing_offload),
    "fsdp_ignored_modules": Rule("refused unless empty: every parameter is sharded", _ignored_modules),
}
"""Every key of accelerate's fsdp_config section (with its fsdp_ prefix), in the order they are converted."""


def convert(conv: Conversion, section: dict[str, Any]) -> None:
    """Fill ``conv`` from the ``fsdp_config`` section (a mapping, checked by the caller)."""
    named = {}
    for name, value in section.items():
        full = name if str(name).startswith("fsdp_") else f"fsdp_{name}"  # accelerate adds the prefix too
        if full not in RULES:
            unknown(conv, _key(str(name)), value, [_key(k) for k in RULES])
        named[full] = value
    version = named.get("fsdp_version", 1)
    if version not in (1, 2, "1", "2"):
        conv.refuse(_key("fsdp_version"), version, "not an FSDP version; allowed: 1, 2")
    _sharding(conv, named, int(version))
    for name, rule in RULES.items():
        if name in named and rule.convert is not _already:
            rule.convert(conv, _key(name), named[name])
    if "fsdp_cpu_ram_efficient_loading" not in named and conv.stage == 3 and conv.get("tensor_parallel.autotp_size", 1) > 1:
        conv.mapped(_key("fsdp_cpu_ram_efficient_loading"), None, "zero_optimization.zero3_init_flag", False,
                    "absent: accelerate's default, false; the model loads whole, and the Trainer splits it for tensor "
                    "parallelism, then shards it (hf_zero's default, a sharded load, cannot be split)")
