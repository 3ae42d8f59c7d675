"""bench/run.py's compiled modes (issue 21) without running jobs: ``X-compile`` is mode X with the
Trainer's ``--torch_compile`` and nothing else changed, and the table's compiled ratios.
(bench/ is not a package: its directory goes on sys.path while run.py is loaded.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_bench_scaling import _load


run = _load("run")
report = _load("report")


def _cmd(mode, *argv):
    opts = run.parse_args(["--modes", mode, *argv])
    opts.world_size = opts.world_size_list[0]
    return run.mode_command(mode, opts, ["--preset", "tiny"], Path("/tmp/o.jsonl"), Path("/tmp/out"))


@pytest.mark.parametrize("mode", ["plain", "hfzero-s2", "hfzero-s3", "fsdp2"])
def test_a_compiled_mode_is_its_eager_mode_with_torch_compile(mode):
    eager, compiled = _cmd(mode), _cmd(f"{mode}-compile")
    assert compiled == [*eager, "--torch_compile"] and "--torch_compile" not in eager


def test_fsdp2_compiled_with_checkpointing_keeps_fsdps_own():
    cmd = _cmd("fsdp2-compile", "--extra=--gradient_checkpointing")
    assert "bench/configs/fsdp2_ac.json" in cmd and "--gradient_checkpointing" not in cmd and cmd[-1] == "--torch_compile"


def test_compiled_ratios_of_the_modes_that_ran():
    records = [{"mode": "hfzero-s3", "status": "ok", "tok_per_s": 46_418.0},
               {"mode": "hfzero-s3-compile", "status": "ok", "tok_per_s": 52_653.0},
               {"mode": "plain-compile", "status": "ok", "tok_per_s": 53_362.0},
               {"mode": "hfzero-s2-compile", "status": "failed", "tok_per_s": None}]
    lines = report.compiled_lines(records)
    assert "| hfzero-s3-compile / hfzero-s3 | 1.134 | >= 1.25 |" in lines
    assert "| hfzero-s3-compile / plain-compile | 0.987 | >= 1.0 |" in lines
    assert not [line for line in lines if "hfzero-s2-compile" in line]  # it failed: no ratio
    assert report.compiled_lines(records[:1]) == []  # nothing compiled: no table
