"""config and world size checks: the file loads as hf_zero would; train_batch_size against W."""

import warnings

import pytest

from hf_zero.doctor.config_checks import check_config, check_world_size, load_zero_config
from hf_zero.doctor.result import Status


def test_good_config_passes(write_config):
    path = write_config({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    config, result = load_zero_config(path)
    assert config.zero.stage == 2
    assert result.status is Status.PASS
    assert result.detail == f"{path}: stage 2, dtype bf16, optimizer the Trainer's"


def test_bad_key_fails_with_the_loader_message(write_config):
    path = write_config({"zero_optimization": {"stgae": 2}})
    config, result = load_zero_config(path)
    assert config is None
    assert result.status is Status.FAIL
    assert result.detail == f"unknown key 'zero_optimization.stgae' in {path}; did you mean 'stage'?"
    assert "check-config" in result.fix


def test_missing_file_fails(tmp_path):
    result = check_config(str(tmp_path / "nope.json"))
    assert (result.status, result.detail) == (Status.FAIL, f"config file not found: {tmp_path / 'nope.json'}")


def test_no_config_is_skipped():
    assert check_config(None).status is Status.SKIP


def test_nvme_param_offload_is_built(write_config, tmp_path):
    path = write_config({"bf16": {"enabled": True}, "zero_optimization": {  # bf16: see test_auto_precision_...
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}}})
    config, result = load_zero_config(path)
    assert result.status is Status.PASS and result.detail.endswith("offload_param nvme")
    assert config is not None and config.zero.offload_param.device == "nvme"


def test_nvme_optimizer_offload_is_built(write_config, tmp_path):
    path = write_config({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "offload_optimizer": {
        "device": "nvme", "nvme_path": str(tmp_path)}}})
    config, result = load_zero_config(path)
    assert result.status is Status.PASS and result.detail.endswith("offload_optimizer nvme")


def test_loader_warning_becomes_a_warn_row(write_config):
    """The loader's "accepted but not applied" warning is a WARN row, not a printed warning."""
    path = write_config({"zero_optimization": {"stage": 1}, "activation_checkpointing": {"profile": True}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, result = load_zero_config(path)
    assert caught == []
    assert result.status is Status.WARN
    assert "accepts but does not apply" in result.detail and "activation_checkpointing" in result.detail


@pytest.mark.parametrize("world, status", [(4, Status.PASS), (3, Status.FAIL)])
def test_world_size(write_config, world, status):
    path = write_config({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2,
                         "gradient_accumulation_steps": 2})
    config, _ = load_zero_config(path)
    result = check_world_size(config, world)
    assert result.status is status
    if status is Status.FAIL:
        assert result.detail == (
            f"train_batch_size = 16 in {path} but train_micro_batch_size_per_gpu (2) * gradient_accumulation_steps "
            '(2) * world_size (3) = 12; make them equal or set train_batch_size to "auto"')


@pytest.mark.parametrize("world, status", [(8, Status.PASS), (4, Status.FAIL), (5, Status.FAIL)])
def test_world_size_with_sequence_parallelism(write_config, world, status):
    """The 2 ranks of a sequence-parallel group share a batch: 16 = 2 * 2 * (8 / 2); 2 does not divide 5."""
    path = write_config({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2,
                         "gradient_accumulation_steps": 2, "sequence_parallel_size": 2})
    config, _ = load_zero_config(path)
    result = check_world_size(config, world)
    assert result.status is status
    if world == 4:
        assert "world_size / sequence_parallel_size (2) = 8" in result.detail
    if world == 5:
        assert "sequence_parallel_size = 2" in result.detail and "does not divide the world size 5" in result.detail


def test_world_size_auto_and_no_config(write_config):
    config, _ = load_zero_config(write_config({"train_batch_size": "auto"}))
    assert check_world_size(config, 7).status is Status.PASS
    assert check_world_size(None, 7).status is Status.SKIP
