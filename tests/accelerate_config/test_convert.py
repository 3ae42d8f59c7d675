"""hf-zero convert-accelerate: accelerate config files (the YAML `accelerate config` writes) -> zero configs.

The sample files are accelerate's documented formats (its `accelerate config` output for DeepSpeed
and FSDP, docs "DeepSpeed" / "Fully Sharded Data Parallel"), written here by the tests.
"""

from __future__ import annotations

import json

import pytest
import yaml

from hf_zero import cli
from hf_zero.accelerate_config import (AccelerateConfigError, convert_file, convert_mapping, deepspeed_section,
                                       fsdp_section, mapping_markdown, parallelism_section, read_yaml)
from hf_zero.config import AUTO, ConfigError, load_config
from hf_zero.config.unsupported import UnsupportedConfig

LAUNCH = {  # the top-level keys `accelerate config` writes for one machine
    "compute_environment": "LOCAL_MACHINE", "debug": False, "downcast_bf16": "no", "machine_rank": 0,
    "main_training_function": "main", "mixed_precision": "bf16", "num_machines": 1, "num_processes": 8,
    "rdzv_backend": "static", "same_network": True, "tpu_env": [], "tpu_use_cluster": False, "tpu_use_sudo": False,
    "use_cpu": False,
}
DEEPSPEED_ZERO3 = {**LAUNCH, "distributed_type": "DEEPSPEED", "deepspeed_config": {
    "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "offload_optimizer_device": "cpu",
    "offload_param_device": "cpu", "zero3_init_flag": True, "zero3_save_16bit_model": True, "zero_stage": 3}}
FSDP_FULL_SHARD = {**LAUNCH, "num_processes": 2, "distributed_type": "FSDP", "fsdp_config": {
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_backward_prefetch": "BACKWARD_PRE",
    "fsdp_cpu_ram_efficient_loading": True, "fsdp_forward_prefetch": False, "fsdp_offload_params": False,
    "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_sync_module_states": True, "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
    "fsdp_use_orig_params": True}}


def convert(data: dict):
    return convert_mapping(data, "accelerate.yaml")


def fsdp(**section) -> dict:
    return {**LAUNCH, "distributed_type": "FSDP", "fsdp_config": section}


def deepspeed(**section) -> dict:
    return {**LAUNCH, "distributed_type": "DEEPSPEED", "deepspeed_config": section}


def refusal(data: dict) -> str:
    with pytest.raises(ValueError) as caught:
        convert(data)
    return str(caught.value)


def reported(conversion) -> list[str]:
    return [note.key for note in conversion.notes]


def test_deepspeed_zero3_offload():
    conversion = convert(DEEPSPEED_ZERO3)
    assert conversion.config == {
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                              "zero3_init_flag": True},
        "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "bf16": {"enabled": True}, "fp16": {"enabled": False}}
    assert conversion.launch_flags == ["--num_gpus", "8"] and conversion.script_flags == ["--bf16"]
    every = [*LAUNCH, "distributed_type", *(f"deepspeed_config.{k}" for k in DEEPSPEED_ZERO3["deepspeed_config"])]
    assert sorted(reported(conversion)) == sorted(every)  # each key once: mapped or not needed
    save = next(n for n in conversion.notes if n.key.endswith("zero3_save_16bit_model"))
    assert save.outcome == "not needed" and "streamed" in save.text


def test_deepspeed_defaults_are_accelerates():
    """No zero_stage: accelerate's 2; stage 3 without zero3_init_flag: accelerate turns it on."""
    assert convert(deepspeed()).config["zero_optimization"] == {"stage": 2}
    assert convert(deepspeed(zero_stage=3)).config["zero_optimization"] == {"stage": 3, "zero3_init_flag": True}
    assert convert(deepspeed(zero_stage=2, zero3_init_flag=True)).config["zero_optimization"] == {"stage": 2}


def test_mixed_precision_no_leaves_the_dtype_to_the_script():
    for value in ("no", False):  # YAML 1.1 reads an unquoted `no` as false
        conversion = convert({**deepspeed(zero_stage=2), "mixed_precision": value})
        assert "bf16" not in conversion.config and "fp16" not in conversion.config
        assert conversion.script_flags == [] and load_config(conversion.config).precision.dtype is AUTO


def test_param_offload_below_stage_3_is_left_out_and_without_optimizer_offload_refused():
    conversion = convert(deepspeed(zero_stage=2, offload_optimizer_device="cpu", offload_param_device="cpu"))
    assert "offload_param" not in conversion.config["zero_optimization"]
    assert "DeepSpeed ignores it at stage 2" in next(n.text for n in conversion.notes if "offload_param" in n.key)
    message = refusal(deepspeed(zero_stage=3, offload_param_device="cpu"))
    assert message.startswith('deepspeed_config.offload_param_device = "cpu" in accelerate.yaml: parameter offload '
                              "needs optimizer offload in hf_zero")


def test_nvme_paths():
    conversion = convert(deepspeed(zero_stage=3, offload_optimizer_device="nvme", offload_optimizer_nvme_path="/nvme",
                                   offload_param_device="nvme", offload_param_nvme_path="/nvme"))
    zero = conversion.config["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "nvme", "nvme_path": "/nvme"} == zero["offload_param"]
    unused = convert(deepspeed(zero_stage=2, offload_optimizer_nvme_path="none"))
    assert "offload_optimizer" not in unused.config["zero_optimization"]


def test_deepspeed_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}, "bf16": {"enabled": "auto"},
          "train_micro_batch_size_per_gpu": "auto"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    conversion = convert(deepspeed(deepspeed_config_file="ds.json", zero3_init_flag=False,
                                   deepspeed_multinode_launcher="standard"))
    assert conversion.config == {**ds, "bf16": {"enabled": True}, "fp16": {"enabled": False}}
    assert conversion.launch_flags[-2:] == ["--launcher", "torchrun"]
    assert refusal(deepspeed(deepspeed_config_file="ds.json", zero_stage=3)) == (
        "deepspeed_config.zero_stage = 3 in accelerate.yaml: accelerate refuses it beside "
        "deepspeed_config.deepspeed_config_file; write it in ds.json instead")
    (tmp_path / "fp16.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "fp16": {"enabled": True}}))
    assert "the DeepSpeed config says fp16.enabled = true" in refusal(deepspeed(deepspeed_config_file="fp16.json"))
    assert "not found: missing.json" in refusal(deepspeed(deepspeed_config_file="missing.json"))


@pytest.mark.parametrize(("section", "stage"), [
    ({"fsdp_sharding_strategy": "FULL_SHARD"}, 3),
    ({"fsdp_sharding_strategy": "shard_grad_op"}, 2),
    ({"fsdp_sharding_strategy": 3}, 0),  # FSDP's ShardingStrategy numbers, as old files write them
    ({"fsdp_reshard_after_forward": "SHARD_GRAD_OP"}, 2),  # accelerate 1.x's FSDP1 spelling
    ({"fsdp_version": 2, "fsdp_reshard_after_forward": True}, 3),
    ({"fsdp_version": 2, "fsdp_reshard_after_forward": False}, 2),
    ({"sharding_strategy": "FULL_SHARD"}, 3),  # without the fsdp_ prefix, which accelerate adds
    ({}, 3),  # accelerate's default: FULL_SHARD
])
def test_fsdp_sharding_becomes_a_stage(section, stage):
    assert convert(fsdp(**section)).config["zero_optimization"]["stage"] == stage


def test_fsdp_full_shard_example():
    conversion = convert(FSDP_FULL_SHARD)
    assert conversion.config == {"zero_optimization": {"stage": 3, "zero3_init_flag": True},
                                 "bf16": {"enabled": True}, "fp16": {"enabled": False}}
    every = [*LAUNCH, "distributed_type", *(f"fsdp_config.{k}" for k in FSDP_FULL_SHARD["fsdp_config"])]
    assert sorted(reported(conversion)) == sorted(every)


def test_shard_grad_op_says_the_params_stay_whole():
    note = convert(fsdp(fsdp_sharding_strategy="SHARD_GRAD_OP")).notes
    assert "the full params stay on every rank between steps" in next(n.text for n in note if "sharding" in n.key)


def test_fsdp_offload():
    zero3 = convert(fsdp(fsdp_offload_params=True)).config["zero_optimization"]
    assert zero3["offload_param"] == zero3["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    zero2 = convert(fsdp(fsdp_version=2, fsdp_reshard_after_forward=False, fsdp_offload_params=True)).config
    assert zero2["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert "offload needs a sharded strategy" in refusal(fsdp(fsdp_sharding_strategy="NO_SHARD",
                                                              fsdp_offload_params=True))


def test_fsdp_no_prefetch_and_checkpointing():
    conversion = convert(fsdp(fsdp_backward_prefetch="NO_PREFETCH", fsdp_activation_checkpointing=True))
    assert conversion.config["zero_optimization"]["stage3_prefetch_bucket_size"] == 0
    assert conversion.script_flags == ["--gradient_checkpointing", "--bf16"]


def test_parallelism_config_sizes_become_tp_and_sp():
    """accelerate's parallelism_config: tp_size is tensor_parallel.autotp_size, sp_size (ALST's Ulysses)
    sequence_parallel_size; the other keys at their defaults are reported as not needed."""
    section = {"parallelism_config_dp_replicate_size": 1, "parallelism_config_dp_shard_size": 4,
               "parallelism_config_tp_size": 2, "parallelism_config_cp_size": 1,
               "parallelism_config_cp_backend": "torch", "parallelism_config_cp_comm_strategy": "allgather"}
    whole = {**FSDP_FULL_SHARD["fsdp_config"], "fsdp_cpu_ram_efficient_loading": False}
    tp = convert({**FSDP_FULL_SHARD, "fsdp_config": whole, "num_processes": 8, "parallelism_config": section})
    assert tp.config["tensor_parallel"] == {"autotp_size": 2} and "sequence_parallel_size" not in tp.config
    assert sorted(k for k in reported(tp) if k.startswith("parallelism_config.")) == sorted(
        f"parallelism_config.{k}" for k in section)
    sp = convert({**deepspeed(zero_stage=3), "parallelism_config": {
        "sp_size": 4, "sp_backend": "deepspeed", "sp_seq_length": 2048, "sp_seq_length_is_variable": True,
        "sp_attn_implementation": "sdpa"}})  # keys without their prefix read the same
    assert sp.config["sequence_parallel_size"] == 4 and "tensor_parallel" not in sp.config
    assert load_config(sp.config).sequence_parallel_size == 4
    assert "parallelism_config.parallelism_config_sp_size" in reported(sp)
    assert sorted(parallelism_section.RULES) == sorted(
        f"parallelism_config_{k}" for k in ("dp_replicate_size", "dp_shard_size", "tp_size", "cp_size", "cp_backend",
                                            "cp_comm_strategy", "sp_size", "sp_backend", "sp_seq_length",
                                            "sp_seq_length_is_variable", "sp_attn_implementation"))


def test_tensor_parallelism_at_stage_3_loads_whole():
    """The Trainer splits a whole model for tp: cpu_ram_efficient_loading true (a sharded load, zero3_init_flag) is
    refused at the file's own key; absent it is accelerate's default, false, written out (hf_zero's default at stage
    3 is a sharded load, which the table refuses with tp)."""
    tp = {"parallelism_config": {"tp_size": 2}}
    assert refusal({**FSDP_FULL_SHARD, **tp}) == (
        "fsdp_config.fsdp_cpu_ram_efficient_loading = true in accelerate.yaml: with parallelism_config tp_size = 2: a "
        "sharded load (zero3_init_flag) cannot be split for tensor parallelism in hf_zero (not built yet); set it to "
        "false: every rank loads the whole model, which the Trainer splits, then shards")
    absent = {k: v for k, v in FSDP_FULL_SHARD["fsdp_config"].items() if k != "fsdp_cpu_ram_efficient_loading"}
    conversion = convert({**FSDP_FULL_SHARD, "fsdp_config": absent, **tp})
    assert conversion.config["zero_optimization"]["zero3_init_flag"] is False
    assert "fsdp_config.fsdp_cpu_ram_efficient_loading" in reported(conversion)
    assert load_config(conversion.config).tensor_parallel.autotp_size == 2
    # without tp the absent key keeps hf_zero's default (a sharded load): nothing written
    assert "zero3_init_flag" not in convert({**FSDP_FULL_SHARD, "fsdp_config": absent}).config["zero_optimization"]
    # DeepSpeed's own zero3_init_flag (absent: accelerate's default true) with tp: the table's row
    with pytest.raises(UnsupportedConfig, match="tensor parallelism on a model loaded sharded"):
        convert({**deepspeed(zero_stage=3), **tp})


def test_fsdp_checkpointing_offload_is_cpu_checkpointing():
    """accelerate's offload_wrapper keeps each checkpointed layer's input on the host: hf_zero's cpu_checkpointing,
    which needs the script's --gradient_checkpointing (fsdp_activation_checkpointing's flag)."""
    conversion = convert(fsdp(fsdp_version=2, fsdp_activation_checkpointing=True,
                              fsdp_activation_checkpointing_offload="true"))
    assert conversion.config["activation_checkpointing"] == {"cpu_checkpointing": True}
    assert conversion.script_flags == ["--gradient_checkpointing", "--bf16"]
    [note] = [n for n in conversion.notes if n.key == "fsdp_config.fsdp_activation_checkpointing_offload"]
    assert note.outcome == "mapped" and "activation_checkpointing.cpu_checkpointing = true" in note.text
    assert load_config(conversion.config).activation_checkpointing.cpu_checkpointing
    off = convert(fsdp(fsdp_activation_checkpointing=True, fsdp_activation_checkpointing_offload=False))
    assert "activation_checkpointing" not in off.config


@pytest.mark.parametrize(("data", "words"), [
    (fsdp(fsdp_sharding_strategy="HYBRID_SHARD"), 'fsdp_config.fsdp_sharding_strategy = "HYBRID_SHARD" in '
                                                  "accelerate.yaml: hybrid sharding"),
    (fsdp(fsdp_sharding_strategy=5), "fsdp_config.fsdp_sharding_strategy = 5 in accelerate.yaml: hybrid sharding"),
    (fsdp(fsdp_sharding_strategy="FULL"), 'allowed: "FULL_SHARD", "SHARD_GRAD_OP"'),
    (fsdp(fsdp_activation_checkpointing_offload=True), "fsdp_config.fsdp_activation_checkpointing_offload = true in "
                                                       "accelerate.yaml: needs fsdp_config.fsdp_activation_checkpointing"),
    (fsdp(fsdp_ignored_modules="lm_head"), "modules cannot be left out"),
    (fsdp(fsdp_version=3), "allowed: 1, 2"),
    (fsdp(fsdp_offload_param=True), "did you mean 'fsdp_offload_params'?"),
    ({**deepspeed(), "mixed_precision": "fp8"}, 'mixed_precision = "fp8" in accelerate.yaml: fp8 training'),
    ({**deepspeed(), "fp8_config": {"backend": "TE"}}, "fp8 training is not implemented"),
    ({**deepspeed(), "parallelism_config": {"parallelism_config_cp_size": 2}},
     "parallelism_config.parallelism_config_cp_size = 2 in accelerate.yaml: context parallelism"),
    ({**deepspeed(), "parallelism_config": {"dp_replicate_size": 2}}, "hybrid sharding"),
    ({**deepspeed(), "parallelism_config": {"sp_size": 2, "sp_attn_implementation": "flash_attention_2"}},
     "allowed: sdpa, eager"),
    ({**deepspeed(), "parallelism_config": {"sp_size": 2, "tp_size": 2}}, "sequence parallelism together with tensor"),
    ({**deepspeed(), "parallelism_config": {"pp_size": 2}}, "not a key of accelerate's config file"),
    ({**deepspeed(), "num_processez": 8}, "did you mean 'num_processes'?"),
    ({**deepspeed(), "compute_environment": "AMAZON_SAGEMAKER"}, "not on SageMaker"),
    ({**LAUNCH, "distributed_type": "MULTI_GPU"}, "nothing sharded to convert"),
    ({**LAUNCH, "distributed_type": "DEEPSPEED"}, "deepspeed_config = null in accelerate.yaml: missing"),
    (deepspeed(zero_stage=4), "allowed: 0, 1, 2, 3"),
    (deepspeed(zero_stage=0, offload_optimizer_device="cpu"), "optimizer offload needs ZeRO stage 1, 2 or 3"),
    (deepspeed(offload_optimizer_device="disk"), 'allowed: "none", "cpu", "nvme"'),
    (deepspeed(gradient_clipping="high"), 'not a number >= 0 or "auto"'),
    (deepspeed(zero_stage=3, offload_optimizer_device="nvme"), "needs a directory"),
    ({**deepspeed(), "num_machines": 3}, "not divisible by num_machines = 3"),
])
def test_refusals_name_the_key_the_value_and_why(data, words):
    assert words in refusal(data)


def test_what_this_version_cannot_run_is_refused_from_the_table():
    """fp16 with optimizer offload: the zero config would be refused before any rank starts (unsupported.py)."""
    with pytest.raises(UnsupportedConfig, match="optimizer offload with fp16 loss scaling"):
        convert({**DEEPSPEED_ZERO3, "mixed_precision": "fp16"})


def test_launch_flags():
    data = {**deepspeed(), "num_machines": 2, "num_processes": 16, "machine_rank": 1, "main_process_ip": "10.0.0.1",
            "main_process_port": 29600, "rdzv_backend": "c10d"}
    assert convert(data).launch_flags == ["--num_nodes", "2", "--num_gpus", "8", "--node_rank", "1",
                                          "--master_addr", "10.0.0.1", "--master_port", "29600"]
    assert convert({**deepspeed(), "gpu_ids": "0,1", "num_processes": 2}).launch_flags[-2:] == [
        "--include", "localhost:0,1"]


def test_every_rule_key_is_reported_once():
    """A section with every key of its table: each is mapped or not needed, none silently dropped."""
    full_fsdp = {"fsdp_version": 1, "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_reshard_after_forward": "FULL_SHARD",
                 "fsdp_offload_params": True, "fsdp_cpu_ram_efficient_loading": True, "fsdp_sync_module_states": True,
                 "fsdp_auto_wrap_policy": "SIZE_BASED_WRAP", "fsdp_transformer_layer_cls_to_wrap": "Block",
                 "fsdp_min_num_params": 100000, "fsdp_backward_prefetch": "BACKWARD_POST",
                 "fsdp_forward_prefetch": True, "fsdp_state_dict_type": "FULL_STATE_DICT",
                 "fsdp_use_orig_params": False, "fsdp_activation_checkpointing": False,
                 "fsdp_activation_checkpointing_offload": False, "fsdp_ignored_modules": None}
    assert sorted(full_fsdp) == sorted(fsdp_section.RULES)
    notes = reported(convert(fsdp(**full_fsdp)))
    assert sorted(k for k in notes if k.startswith("fsdp_config.")) == sorted(f"fsdp_config.{k}" for k in full_fsdp)
    full_ds = {"zero_stage": 3, "offload_optimizer_device": "nvme", "offload_optimizer_nvme_path": "/n",
               "offload_param_device": "nvme", "offload_param_nvme_path": "/n", "gradient_accumulation_steps": "auto",
               "gradient_clipping": "auto", "zero3_init_flag": False, "zero3_save_16bit_model": False,
               "deepspeed_moe_layer_cls_names": "MixtralSparseMoeBlock", "deepspeed_multinode_launcher": "pdsh",
               "deepspeed_hostfile": "hostfile", "deepspeed_exclusion_filter": "w1:0",
               "deepspeed_inclusion_filter": "w0"}
    assert sorted([*full_ds, "deepspeed_config_file"]) == sorted(deepspeed_section.RULES)
    notes = reported(convert(deepspeed(**full_ds)))
    assert sorted(k for k in notes if k.startswith("deepspeed_config.")) == sorted(f"deepspeed_config.{k}"
                                                                                    for k in full_ds)


def test_yaml_is_read_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("distributed_type: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(AccelerateConfigError, match="invalid YAML in"):
        read_yaml(str(evil))
    big = tmp_path / "big.yaml"
    big.write_text("debug: false\n" + "#" * (1 << 20))
    with pytest.raises(AccelerateConfigError, match="is too large"):
        read_yaml(str(big))
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(AccelerateConfigError, match="must be a mapping"):
        read_yaml(str(listed))


def test_command_writes_a_config_hf_zero_loads(tmp_path, capsys):
    source, out = tmp_path / "accelerate.yaml", tmp_path / "zero.json"
    source.write_text(yaml.safe_dump(DEEPSPEED_ZERO3))
    assert cli.main(["convert-accelerate", str(source), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"hf-zero launch --num_gpus 8 SCRIPT --zero_config {out} --bf16" in err
    assert "  mapped      deepspeed_config.zero_stage = 3: zero_optimization.stage = 3" in err
    assert json.loads(out.read_text()) == convert_file(str(source)).config
    assert cli.main(["check-config", str(out), "--bf16"]) == 0
    capsys.readouterr()
    assert cli.main(["convert-accelerate", str(source), "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"hf_zero: {out} exists; pass --force to overwrite it\n"
    assert cli.main(["convert-accelerate", str(source), "-o", str(out), "--force"]) == 0


def test_command_refuses_and_writes_nothing(tmp_path, capsys):
    source, out = tmp_path / "accelerate.yaml", tmp_path / "zero.json"
    source.write_text(yaml.safe_dump(fsdp(fsdp_sharding_strategy="HYBRID_SHARD")))
    assert cli.main(["convert-accelerate", str(source), "-o", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f'hf_zero: fsdp_config.fsdp_sharding_strategy = "HYBRID_SHARD" in '
                                              f"{source}: hybrid sharding")
    assert not out.exists()


def test_mapping_table_rows():
    table = mapping_markdown()
    for key in (*fsdp_section.RULES, *deepspeed_section.RULES, "mixed_precision", "num_processes"):
        assert f"{key}` |" in table


def test_converted_configs_load(tmp_path):
    for data in (DEEPSPEED_ZERO3, FSDP_FULL_SHARD, fsdp(fsdp_offload_params=True)):
        config = load_config(convert(data).config)
        assert config.zero.stage == 3
    with pytest.raises(ConfigError):
        load_config({"zero_optimization": {"stage": 5}})
