"""Each combination this version cannot run (hf_zero/config/unsupported.py) is refused by
`hf-zero check-config`, `hf-zero doctor` and the `hf-zero launch` preflight before any rank
starts, and by `python -m hf_zero.run` before the script runs; one message, from the table.

transformers' ds_config_zero3.json ("auto" precision, CPU offload of optimizer and params) runs
with --bf16 and is refused with --fp16: at check-config (--fp16), and at launch from the script's
own flag; without a flag check-config and launch say so in a note and doctor WARNs.
"""

from __future__ import annotations

import pytest

from hf_zero import cli, run
from hf_zero.config import load_config
from hf_zero.config.unsupported import refusals, with_dtype
from tests.config.test_unsupported import DTYPE_ROWS, EXAMPLES, without_dtype

ZERO3_EXAMPLE = {  # transformers' tests/deepspeed/ds_config_zero3.json
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                  "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True, "contiguous_gradients": True,
        "sub_group_size": 1e9, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}


def message_of(path: str, obj: dict, dtype: str | None = None) -> str:
    [message] = refusals(with_dtype(load_config(obj, source=path), dtype))
    return message


def main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_check_config_refuses(capsys, write_config, name):
    path = write_config(EXAMPLES[name][0])
    assert main(capsys, "check-config", path) == (2, "", f"hf_zero: {message_of(path, EXAMPLES[name][0])}\n")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_doctor_fails_the_config_row(capsys, write_config, free_port, name):
    path = write_config(EXAMPLES[name][0])
    code, out, _ = main(capsys, "doctor", "--zero_config", path, "--master_port", str(free_port))
    config_line = next(line for line in out.splitlines() if line.startswith("config "))
    assert code == 1 and config_line.split()[1] == "FAIL"
    assert message_of(path, EXAMPLES[name][0])[:60] in out


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("flag", ["--zero_config", "--deepspeed"])
def test_launch_refuses_before_any_rank_starts(capsys, write_config, script, started, free_port, name, flag):
    path = write_config(EXAMPLES[name][0])
    code, out, err = main(capsys, "launch", "--num_gpus", "2", "--master_port", str(free_port), script, flag, path)
    assert (code, out, err, started) == (2, "", f"hf_zero: {message_of(path, EXAMPLES[name][0])}\n", [])


@pytest.mark.parametrize("name", DTYPE_ROWS)
def test_launch_fills_auto_precision_from_the_scripts_flag(capsys, write_config, script, started, free_port, name):
    obj = without_dtype(EXAMPLES[name][0])
    path = write_config(obj)
    argv = ["launch", "--num_gpus", "2", "--master_port", str(free_port), script, "--zero_config", path]
    expected = f"hf_zero: {message_of(path, obj, 'fp16')}\n"
    for fp16 in (["--fp16"], ["--fp16", "true"], ["--fp16=True"]):
        assert main(capsys, *argv, *fp16) == (2, "", expected), fp16
    assert started == []
    assert main(capsys, *argv, "--bf16")[0] == 0 and len(started) == 1


def test_run_refuses_before_the_script(capsys, write_config, script):
    """torchrun ... -m hf_zero.run: every rank refuses before the script (which would exit 'must not run')."""
    obj = without_dtype(EXAMPLES["fp16-offload"][0])
    path = write_config(obj)
    with pytest.raises(SystemExit) as caught:
        run.main([script, "--zero_config", path, "--fp16"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"hf_zero: {message_of(path, obj, 'fp16')}\n"


def test_transformers_zero3_example(capsys, write_config, script, started, free_port):
    path = write_config(ZERO3_EXAMPLE, "ds_config_zero3.json")
    refused = message_of(path, ZERO3_EXAMPLE, "fp16")
    assert "optimizer offload with fp16 loss scaling is not implemented in hf_zero" in refused
    # check-config: the Trainer's dtype decides; --fp16 is refused, --bf16 runs
    code, out, err = main(capsys, "check-config", path)
    assert code == 0 and out.startswith("{")
    assert err.endswith(f'hf_zero: note: with TrainingArguments.fp16 (--fp16) the "auto" precision becomes fp16 '
                        f"and the run is refused: {refused}\n")
    assert main(capsys, "check-config", path, "--fp16") == (2, "", f"hf_zero: {refused}\n")
    assert main(capsys, "check-config", path, "--bf16")[0] == 0
    # doctor: WARN (it cannot know the script's flags)
    code, out, _ = main(capsys, "doctor", "--zero_config", path, "--master_port", str(free_port))
    config_line = next(line for line in out.splitlines() if line.startswith("config "))
    assert config_line.split()[1] == "WARN" and "--fp16" in config_line
    # launch: refused with the script's --fp16, before any rank; runs with --bf16
    argv = ["launch", "--num_gpus", "2", "--master_port", str(free_port), script, "--deepspeed", path]
    assert main(capsys, *argv, "--fp16") == (2, "", f"hf_zero: {refused}\n") and started == []
    code, _, err = main(capsys, *argv, "--bf16")
    assert code == 0 and len(started) == 1 and "note" not in err
