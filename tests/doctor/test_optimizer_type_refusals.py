"""Optimizer types with no torch equivalent (the 1-bit ones, Lamb, Lion, ...) are named by check-config, doctor
and the launch preflight before any rank starts, and by hf_zero.run before the script, with one message: the
row "optimizer-type" of the table of what this version cannot run (hf_zero/config/unsupported.py), which
reads hf_zero/config/optimizer_block.py REFUSED."""

from __future__ import annotations

import pytest

from hf_zero import cli, run
from hf_zero.config import load_config
from hf_zero.config.optimizer_block import REFUSED
from hf_zero.config.unsupported import refusals

TYPES = ["OneBitAdam", "OneBitLamb", "ZeroOneAdam", "Lamb", "Lion"]


def config(type_: str) -> dict:
    return {"zero_optimization": {"stage": 2}, "optimizer": {"type": type_, "params": {"lr": "auto"}}}


def test_table_covers_the_types():
    assert {t.lower() for t in TYPES} <= set(REFUSED)


@pytest.mark.parametrize("type_", TYPES)
def test_every_entry_point_names_the_type_first(type_, write_config, script, started, free_port, capsys):
    path = write_config(config(type_))
    [words] = refusals(load_config(path))
    assert words.startswith(f'optimizer.type = "{type_}" in {path}: {REFUSED[type_.lower()]} is not implemented')
    assert cli.main(["check-config", path]) == 2
    assert capsys.readouterr().err == f"hf_zero: {words}\n"
    assert cli.main(["doctor", "--zero_config", path, "--master_port", str(free_port)]) == 1
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["config"].split()[1] == "FAIL" and f'optimizer.type = "{type_}"' in rows["config"]
    assert rows["optimizer"].split()[1] == "SKIP" and "refused" in rows["optimizer"]
    assert cli.main(["launch", "--num_gpus", "2", "--master_port", str(free_port), script, "--deepspeed", path]) == 2
    assert capsys.readouterr().err == f"hf_zero: {words}\n" and started == []
    with pytest.raises(SystemExit) as caught:
        run.main([script, "--zero_config", path])
    assert caught.value.code == 2 and capsys.readouterr().err == f"hf_zero: {words}\n"
