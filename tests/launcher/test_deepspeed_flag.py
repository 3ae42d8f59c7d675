"""`--deepspeed FILE` under `hf-zero launch` and `python -m hf_zero.run`: taken as the zero config
(one line says so), never seen by the script; `hf-zero launch` without a zero config says hf_zero is off."""

import json
import os
import sys

import pytest

from hf_zero import cli, run
from hf_zero.launcher.launch import HF_ZERO_OFF
from hf_zero.launcher.zero_config_arg import split_config_flag

from .conftest import DATA

SCRIPT = str(DATA / "record_run.py")


@pytest.fixture
def ds_json(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}))
    return str(path)


def test_launch_says_it_once_and_ranks_get_zero_config(capsys, ds_json):
    code = cli.main(["launch", "--dry_run", "--num_gpus", "2", SCRIPT, "--deepspeed", ds_json, "--bf16"])
    out, err = capsys.readouterr()
    assert code == 0
    assert err == split_config_flag(["--deepspeed", ds_json]).note + "\n"
    [command] = out.splitlines()
    assert command.endswith(f"-m hf_zero.run {SCRIPT} --bf16 --zero_config {ds_json}")
    assert "--deepspeed" not in command  # so no rank says it again, and the Trainer never sees it


def test_launch_without_a_zero_config_says_hf_zero_is_off(capsys):
    assert cli.main(["launch", "--dry_run", "--num_gpus", "1", SCRIPT, "--lr", "1"]) == 0
    assert capsys.readouterr().err == HF_ZERO_OFF + "\n"


@pytest.fixture
def record(tmp_path, monkeypatch, restore_environ):
    path = tmp_path / "record.json"
    monkeypatch.setattr(sys, "argv", ["python -m hf_zero.run"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    os.environ["HF_ZERO_TEST_RECORD"] = str(path)
    return lambda: json.loads(path.read_text())


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_run_takes_deepspeed_as_the_zero_config(record, capsys, ds_json, fake_activate, rank, said):
    os.environ["RANK"] = rank
    run.main([SCRIPT, "--deepspeed", ds_json, "--bf16"])
    assert [c.source for c in fake_activate] == [ds_json]
    assert record()["argv"] == [SCRIPT, "--bf16"]
    note = split_config_flag(["--deepspeed", ds_json]).note
    assert capsys.readouterr().err == (note + "\n" if said else "")
