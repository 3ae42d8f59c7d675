"""Checkpoint saves at ZeRO stage 0 with tensor parallelism or pipeline stages (not built yet) are refused
by `hf-zero launch` before any rank starts, from the script's `--save_strategy` (TrainingArguments'
default "steps" when it passes none), with the message the Trainer itself raises at creation
(hf_zero/config/stage0_saves.py); `check-config` and `doctor`, which do not see the script's
arguments, say the script needs `--save_strategy no`. No rank starts in this file.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hf_zero import cli
from hf_zero.config import load_config
from hf_zero.config.stage0_saves import refusal
from hf_zero.engine.stages import NotAvailableYet
from hf_zero.launcher.zero_config_arg import script_save_strategy

TP = {"tensor_parallel": {"autotp_size": 2}}  # ZeRO stage 0: DeepSpeed's default
PP = {"pipeline": {"stages": 2, "schedule": "GPipe", "micro_batches": 2}, "bf16": {"enabled": True}}


def main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("obj,script_args,strategy", [
    (TP, [], "steps"), (TP, ["--save_strategy", "no", "--save_strategy", "steps"], "steps"),
    (PP, ["--save-strategy", "epoch"], "epoch"), (PP, ["--save_strategy=best"], "best"),
])
def test_launch_refuses_before_any_rank_starts(capsys, write_config, script, started, free_port, obj, script_args,
                                               strategy):
    path = write_config(obj)
    code, out, err = main(capsys, "launch", "--num_gpus", "2", "--master_port", str(free_port), script,
                          "--zero_config", path, *script_args)
    message = refusal(load_config(path), strategy)
    assert message is not None and "at ZeRO stage 0 is not built yet" in message
    assert (code, out, started) == (2, "", [])
    assert err.startswith("hf_zero: preflight check failed before any rank started") and f"  checkpoint saves: " \
        f"{message} (" in err and "fix: pass --save_strategy no to the script" in err, err
    assert ("TrainingArguments' default" in err) == (strategy == "steps" and not script_args), err


@pytest.mark.parametrize("obj,script_args", [
    (TP, ["--save_strategy", "no"]), (PP, ["--save_strategy=no"]), (PP, ["--save-strategy", "epoch", "--save-strategy", "no"]),
    ({**TP, "zero_optimization": {"stage": 1}}, []), ({**PP, "zero_optimization": {"stage": 2}}, ["--save_strategy", "steps"]),
])
def test_launch_runs(capsys, write_config, script, started, free_port, obj, script_args):
    path = write_config(obj)
    code, out, err = main(capsys, "launch", "--num_gpus", "2", "--master_port", str(free_port), script,
                          "--zero_config", path, *script_args)
    assert (code, len(started)) == (0, 1), err
    assert "save_strategy" not in err, err


def test_dry_run_refuses_too(capsys, write_config, script, started):
    path = write_config(TP)
    code, out, err = main(capsys, "launch", "--dry_run", "--num_gpus", "2", script, "--zero_config", path)
    assert (code, out, started) == (2, "", []) and refusal(load_config(path), "steps") in err


def test_check_config_and_doctor_say_the_script_needs_no_saves(capsys, write_config, free_port):
    path = write_config(TP)
    message = refusal(load_config(path), "steps")
    code, out, err = main(capsys, "check-config", path)
    assert code == 0 and out.startswith("{")
    assert err == ("hf_zero: note: the script must pass --save_strategy no (TrainingArguments' default is 'steps'); "
                   f"`hf-zero launch` refuses it otherwise, before any rank starts: {message}\n")
    code, out, _ = main(capsys, "doctor", "--zero_config", path, "--nproc", "2", "--master_port", str(free_port))
    config_line = next(line for line in out.splitlines() if line.startswith("config "))
    assert code == 0 and config_line.split()[1] == "WARN" and "--save_strategy no" in config_line, out
    staged = write_config({**TP, "zero_optimization": {"stage": 1}}, "stage1.json")
    assert main(capsys, "check-config", staged)[2] == ""
    code, out, _ = main(capsys, "doctor", "--zero_config", staged, "--nproc", "2", "--master_port", str(free_port))
    assert next(line for line in out.splitlines() if line.startswith("config ")).split()[1] == "PASS", out


def _trainer(save_strategy):
    """What the Trainer-creation refusals read: args.save_strategy and the model's params."""
    return SimpleNamespace(args=SimpleNamespace(save_strategy=SimpleNamespace(value=save_strategy)),
                           model=SimpleNamespace(parameters=lambda: iter(())))


@pytest.mark.parametrize("obj", [TP, PP])
def test_the_trainer_raises_the_same_message(obj):
    from hf_zero.trainer import pipeline, tensor_parallel

    config = load_config(obj)
    refuse = (lambda t: tensor_parallel._refuse_not_built(t, config, 2)) if obj is TP else \
        (lambda t: pipeline._refuse_not_built(t, config))
    for strategy in ("steps", "epoch"):
        with pytest.raises(NotAvailableYet) as caught:
            refuse(_trainer(strategy))
        assert str(caught.value) == refusal(config, strategy)
    refuse(_trainer("no"))


def test_script_save_strategy():
    assert script_save_strategy([]) is None and script_save_strategy(["--save_steps", "5"]) is None
    assert script_save_strategy(["--save_strategy", "epoch", "--bf16"]) == "epoch"
    assert script_save_strategy(["--save-strategy=no", "--save_strategy", "steps"]) == "steps"
    assert script_save_strategy(["--save_strategy"]) is None  # the script's own parser refuses it
