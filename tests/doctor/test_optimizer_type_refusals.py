"""Optimizer types with no torch equivalent (the 1-bit ones, Lamb, Lion, ...) are named by check-config, doctor
and the launch preflight before any rank starts, and by hf_zero.run before the script: all read the file first,
and the block refuses the type there (hf_zero/config/optimizer_block.py REFUSED)."""

from __future__ import annotations

import pytest

from hf_zero import cli, run
from hf_zero.config.optimizer_block import REFUSED

TYPES = ["OneBitAdam", "OneBitLamb", "ZeroOneAdam", "Lamb", "Lion"]


def config(type_: str) -> dict:
    return {"zero_optimization": {"stage": 2}, "optimizer": {"type": type_, "params": {"lr": "auto"}}}


def test_table_covers_the_types():
    assert {t.lower() for t in TYPES} <= set(REFUSED)


@pytest.mark.parametrize("type_", TYPES)
def test_every_entry_point_names_the_type_first(type_, write_config, script, started, free_port, capsys):
    path = write_config(config(type_))
    words = f'optimizer.type = "{type_}" in {path}: {REFUSED[type_.lower()]}'
    assert cli.main(["check-config", path]) == 2
    assert words in capsys.readouterr().err
    assert cli.main(["doctor", "--zero_config", path, "--master_port", str(free_port)]) == 1
    out = capsys.readouterr().out
    config_line = next(line for line in out.splitlines() if line.startswith("config "))
    assert config_line.split()[1] == "FAIL" and f'optimizer.type = "{type_}"' in out
    assert cli.main(["launch", "--num_gpus", "2", "--master_port", str(free_port), script, "--deepspeed", path]) == 2
    assert words in capsys.readouterr().err and started == []
    with pytest.raises(SystemExit) as caught:
        run.main([script, "--zero_config", path])
    assert caught.value.code == 2 and words in capsys.readouterr().err
