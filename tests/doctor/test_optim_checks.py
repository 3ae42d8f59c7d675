"""doctor's optimizer and scheduler rows: what the config's blocks will build, each value's source."""

from hf_zero.doctor.config_checks import load_zero_config
from hf_zero.doctor.optim_checks import check_blocks
from hf_zero.doctor.result import Status
from hf_zero.doctor.runner import DoctorInputs, run_doctor


def test_blocks_are_described_with_their_sources(write_config):
    path = write_config({"zero_optimization": {"stage": 2},
                         "optimizer": {"type": "Adam", "params": {"lr": "auto", "eps": 1e-6}},
                         "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto",
                                                                           "warmup_num_steps": 100}}})
    config, _ = load_zero_config(path)
    optimizer, scheduler = check_blocks(config)
    assert (optimizer.name, optimizer.status, scheduler.name, scheduler.status) == (
        "optimizer", Status.PASS, "scheduler", Status.PASS)
    assert optimizer.detail.startswith(f'torch.optim.AdamW from optimizer.type "Adam" in {path}: ')
    assert 'lr="auto" (TrainingArguments.learning_rate, filled when the Trainer starts)' in optimizer.detail
    assert "betas=[0.9, 0.999] (DeepSpeed's default)" in optimizer.detail
    assert "eps=1e-06 (config)" in optimizer.detail and "weight_decay=0.0 (DeepSpeed's default)" in optimizer.detail
    assert "one group" in optimizer.detail
    assert scheduler.detail.startswith(f"WarmupDecayLR (DeepSpeed's formula) from scheduler.type \"WarmupDecayLR\"")
    assert 'total_num_steps="auto" (num_training_steps, filled when the Trainer starts)' in scheduler.detail
    assert "warmup_num_steps=100 (config)" in scheduler.detail
    assert "warmup_max_lr=0.001 (DeepSpeed's default)" in scheduler.detail


def test_without_blocks_the_trainers_own_run(write_config):
    path = write_config({"zero_optimization": {"stage": 1}})
    config, _ = load_zero_config(path)
    optimizer, scheduler = check_blocks(config)
    assert optimizer.status is Status.PASS and optimizer.detail.startswith("the Trainer's own (TrainingArguments.optim")
    assert scheduler.detail.endswith(f"no scheduler block in {path}")
    assert [r.status for r in check_blocks(None)] == [Status.SKIP, Status.SKIP]


def test_doctor_lists_the_rows_after_the_config(write_config):
    path = write_config({"optimizer": {"type": "SGD", "params": {"lr": "auto", "momentum": 0.9}}})
    names = [r.name for r in run_doctor(DoctorInputs(zero_config=path, nproc=1), environ={})]
    assert names[:4] == ["config", "world size", "optimizer", "scheduler"]
