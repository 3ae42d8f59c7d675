"""The table of combinations this version cannot run (hf_zero/config/unsupported.py).

Every row has an example here (a new row without one fails ``test_every_row_has_an_example``);
the command-line refusals of each row (check-config, doctor, launch) are in
tests/doctor/test_refusals.py.
"""

from __future__ import annotations

import types

import pytest

from hf_zero.config import AUTO, ConfigError, load_config, resolve_config
from hf_zero.config.unsupported import (
    UNSUPPORTED,
    UnsupportedConfig,
    conditional_note,
    refusals,
    refusals_by_dtype,
    refuse,
    with_dtype,
)

OFFLOAD = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
# name -> (a DeepSpeed file the row refuses with fp16, words its message must hold)
EXAMPLES = {
    "fp16-offload": ({"fp16": {"enabled": True}, "zero_optimization": OFFLOAD},
                     ['zero_optimization.offload_optimizer.device = "cpu"', "fp16 training",
                      "optimizer offload with fp16 loss scaling is not implemented in hf_zero", "train in bf16"]),
    "fp16-static-loss-scale": ({"fp16": {"enabled": True, "loss_scale": 128}, "zero_optimization": {"stage": 1}},
                               ["fp16.loss_scale = 128", "a static fp16 loss scale is not implemented",
                                "set fp16.loss_scale to 0 (dynamic loss scaling)"]),
    "optimizer-type": ({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2},
                        "optimizer": {"type": "ZeroOneAdam", "params": {"lr": "auto", "var_freeze_step": 100}}},
                       ['optimizer.type = "ZeroOneAdam"', "0/1 Adam's compressed gradient communication",
                        'use "AdamW" or another type hf_zero builds']),
    "partition-activations": ({"zero_optimization": {"stage": 2}, "activation_checkpointing": {
                                  "partition_activations": True, "cpu_checkpointing": True}},
                              ["activation_checkpointing.partition_activations = true",
                               "partitioning activation checkpoints without sequence parallelism",
                               "set it to false"]),
    "sequence-parallel-tp": ({"zero_optimization": {"stage": 1}, "sequence_parallel_size": 2,
                              "tensor_parallel": {"autotp_size": 2}},
                             ["sequence_parallel_size = 2 with tensor_parallel.autotp_size = 2",
                              "sequence parallelism together with tensor parallelism", "use one of the two"]),
    "sparse-attention-per-head-tp": ({"zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 2},
                                      "sparse_attention": {"different_layout_per_head": True}},
                                     ["sparse_attention.different_layout_per_head = true with "
                                      "tensor_parallel.autotp_size = 2", "per-head sparse layouts",
                                      "set different_layout_per_head to false"]),
    "tensor-parallel-offload": ({"zero_optimization": OFFLOAD, "tensor_parallel": {"autotp_size": 2}},
                                ['tensor_parallel.autotp_size = 2 with zero_optimization.offload_optimizer.device = '
                                 '"cpu", zero_optimization.offload_param.device = "none"',
                                 "optimizer or parameter offload with tensor parallelism", 'device to "none"']),
    "tensor-parallel-sharded-load": ({"zero_optimization": {"stage": 3}, "tensor_parallel": {"autotp_size": 2}},
                                     ["tensor_parallel.autotp_size = 2 with zero_optimization.stage = 3 and "
                                      "zero_optimization.zero3_init_flag = true",
                                      "tensor parallelism on a model loaded sharded",
                                      "set zero_optimization.zero3_init_flag to false"]),
    "pipeline-stage3": ({"zero_optimization": {"stage": 3}, "pipeline": {"stages": 2}},
                        ["pipeline.stages = 2 with zero_optimization.stage = 3",
                         "ZeRO stage 3 inside pipeline stages (not built yet)", "use zero_optimization.stage 0, 1 or 2"]),
    "pipeline-sequence-parallel": ({"zero_optimization": {"stage": 1}, "pipeline": {"stages": 2},
                                    "sequence_parallel_size": 2},
                                   ["pipeline.stages = 2 with sequence_parallel_size = 2",
                                    "pipeline and sequence parallelism together (not built yet)", "use one of the two"]),
    "pipeline-offload": ({"zero_optimization": OFFLOAD, "pipeline": {"stages": 2}},
                         ['pipeline.stages = 2 with zero_optimization.offload_optimizer.device = "cpu"',
                          "offload with pipeline stages (not built yet)", 'device to "none"']),
    "pipeline-fp16": ({"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}, "pipeline": {"stages": 2}},
                      ["pipeline.stages = 2 with fp16 training", "fp16 loss scaling across pipeline stages (not built yet)",
                       "train in bf16"]),
}


@pytest.mark.parametrize("zero", [
    {"stage": 3, "zero3_init_flag": False},  # loads whole, split and sharded at Trainer creation
    {"stage": 2, "zero3_init_flag": True},  # the flag loads sharded at stage 3 only
    {"stage": 3, "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"}, "zero3_init_flag": False},
])
def test_tensor_parallel_runs(zero):
    assert refusals(load({"zero_optimization": zero, "tensor_parallel": {"autotp_size": 2}})) == []


@pytest.mark.parametrize("offload", [{"offload_optimizer": {"device": "cpu"}},
                                     {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}])
def test_tensor_parallel_offload_names_both_devices(offload):
    [message] = refusals(load({"zero_optimization": {"stage": 3, "zero3_init_flag": False, **offload},
                               "tensor_parallel": {"autotp_size": 2}}))
    param = offload.get("offload_param", {"device": "none"})["device"]
    assert message.startswith('tensor_parallel.autotp_size = 2 with zero_optimization.offload_optimizer.device = '
                              f'"cpu", zero_optimization.offload_param.device = "{param}" in ds.json: ')


def test_tensor_parallel_at_stage_3_with_offload_is_refused_for_both():
    """The default zero3_init_flag and the offload: two rows, both said at once."""
    config = load({"zero_optimization": {"stage": 3, **{k: {"device": "cpu"} for k in ("offload_optimizer",
                                                                                     "offload_param")}},
                   "tensor_parallel": {"autotp_size": 4}})
    assert [r.name for r in UNSUPPORTED if r.applies(config)] == ["tensor-parallel-offload",
                                                                  "tensor-parallel-sharded-load"]
    assert len(refusals(config)) == 2


def test_partition_activations_with_sequence_parallelism_runs():
    """With sequence_parallel_size > 1 each rank's checkpoints are already its slice of the sequence."""
    obj = {**EXAMPLES["partition-activations"][0], "sequence_parallel_size": 2}
    assert refusals(load(obj)) == []


DTYPE_ROWS = sorted(row.name for row in UNSUPPORTED if "fp16.enabled" in row.keys)
"""Rows that only an fp16 run hits (the rest refuse whatever the dtype)."""


def load(obj: dict):
    return load_config(obj, source="ds.json")


def without_dtype(obj: dict) -> dict:
    """The same file with its precision left to the Trainer ("auto")."""
    return {**obj, "fp16": {**obj["fp16"], "enabled": "auto"}}


def test_every_row_has_an_example():
    assert sorted(EXAMPLES) == sorted(row.name for row in UNSUPPORTED)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_row_refuses_naming_keys_values_and_the_alternative(name):
    obj, words = EXAMPLES[name]
    config = load(obj)
    with pytest.raises(UnsupportedConfig) as caught:
        refuse(config)
    message = str(caught.value)
    assert " in ds.json: " in message
    for word in words:
        assert word in message
    assert isinstance(caught.value, ConfigError) and isinstance(caught.value, NotImplementedError)
    [row] = [r for r in UNSUPPORTED if r.name == name]
    assert [r.name for r in UNSUPPORTED if r.applies(config)] == [name]
    for key in row.keys:  # each key the row reads, by name (the dtype as "fp16 training")
        assert key in message or key == "fp16.enabled" and "fp16 training" in message


@pytest.mark.parametrize("name", DTYPE_ROWS)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_other_dtypes_run(name, dtype):
    obj, _ = EXAMPLES[name]
    config = with_dtype(load(without_dtype(obj)), dtype)
    assert refusals(config) == []


@pytest.mark.parametrize("name", DTYPE_ROWS)
def test_auto_precision_is_refused_only_once_fp16_is_known(name):
    """[Note: "auto" precision]: the file runs with --bf16, so only the fp16 case is refused."""
    config = load(without_dtype(EXAMPLES[name][0]))
    assert config.precision.dtype is AUTO
    assert refusals(config) == []
    refuse(config)  # nothing to refuse yet
    by_dtype = refusals_by_dtype(config)
    assert list(by_dtype) == ["fp16"] and len(by_dtype["fp16"]) == 1
    assert by_dtype["fp16"] == refusals(with_dtype(config, "fp16"))
    note = conditional_note(config)
    assert note.startswith('with TrainingArguments.fp16 (--fp16) the "auto" precision becomes fp16 and the run '
                           "is refused: ") and by_dtype["fp16"][0] in note


def test_a_file_that_names_its_dtype_is_not_refilled():
    config = load({"bf16": {"enabled": True}, "zero_optimization": OFFLOAD})
    assert with_dtype(config, "fp16") is config
    assert conditional_note(config) is None and refusals_by_dtype(config) == {}


def test_two_rows_are_refused_together():
    config = load({"fp16": {"enabled": True, "loss_scale": 8}, "zero_optimization": OFFLOAD})
    with pytest.raises(UnsupportedConfig) as caught:
        refuse(config)
    assert len(str(caught.value).splitlines()) == 2


@pytest.mark.parametrize("dtype", ["auto", "bf16", "fp32"])
def test_optimizer_type_is_refused_whatever_the_dtype(dtype):
    obj = {**EXAMPLES["optimizer-type"][0], "fp16": {"enabled": dtype == "auto" and "auto"},
           **({"bf16": {"enabled": True}} if dtype == "bf16" else {})}
    config = load(obj)
    assert [m.split(":")[0] for m in refusals(config)] == ['optimizer.type = "ZeroOneAdam" in ds.json']
    assert refusals_by_dtype(config) == {}


@pytest.mark.parametrize("written", ["AdamW", "adam", "SGD"])
def test_types_hf_zero_builds_are_not_refused(written):
    assert refusals(load({"zero_optimization": {"stage": 2}, "optimizer": {"type": written}})) == []


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_static_loss_scale_is_refused_at_every_stage(stage):
    """Every stage runs hf_zero's dynamic scaler (trainer/loss_scaling.py), stage 0 too: none honours a static one."""
    [message] = refusals(load({"fp16": {"enabled": True, "loss_scale": 128}, "zero_optimization": {"stage": stage}}))
    assert message.startswith("fp16 training with fp16.loss_scale = 128.0 in ds.json: a static fp16 loss scale")


def _training_args(**kwargs):
    values = dict(per_device_train_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0, fp16=False,
                  bf16=False, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                  weight_decay=0.0)
    return types.SimpleNamespace(**{**values, **kwargs})


def test_resolve_config_refuses_once_the_trainer_says_fp16():
    """transformers' zero3 example (fp16 "auto" + CPU offload) is refused when the Trainer is created with fp16."""
    config = load(without_dtype(EXAMPLES["fp16-offload"][0]))
    assert resolve_config(config, _training_args(bf16=True), world_size=2).precision.dtype == "bf16"
    with pytest.raises(UnsupportedConfig) as caught:
        resolve_config(config, _training_args(fp16=True), world_size=2)
    assert str(caught.value) == refusals(with_dtype(config, "fp16"))[0]


def test_every_row_is_in_troubleshooting():
    """docs/troubleshooting.md, "Features not implemented yet", names each row's feature."""
    import pathlib

    docs = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md").read_text()
    section = docs[docs.index("### Features not implemented yet"):]
    section = section[:section.index("\n## ")]
    for row in UNSUPPORTED:
        assert f"| `{row.feature}`" in section, row.name
