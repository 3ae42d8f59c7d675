"""A full disk never costs the earlier output, and says so in one line: ``No space left on device
writing PATH (N bytes needed, M free)``, from ``consolidate``, the stage-3 streamed ``save_model``
and the sharded checkpoint save (where DCP would wrap it as ``CheckpointException``)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from hf_zero.checkpoint.atomic import DiskFullError
from hf_zero.checkpoint.consolidate import consolidate
from hf_zero.cli import main as cli
from hf_zero.testing.multiprocess import RankFailure, run_on_ranks
from tests.faults.disk import small_disk

DS_TIED = Path(__file__).resolve().parents[1] / "data" / "deepspeed_ckpt" / "stage2" / "tied"
FULL = r"No space left on device writing (\S+) \((\d+) bytes needed, (\d+) free\)"
PAGE = 4096


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _leftovers(folder) -> list[str]:
    return [f for f in os.listdir(folder) if "tmp" in f]


def test_consolidate_over_an_earlier_output_keeps_it_when_the_disk_fills(tmp_path, capsys):
    src = tmp_path / "ckpt"
    shutil.copytree(DS_TIED, src)
    # sizes of the two outputs, on the real disk
    bf16 = consolidate(str(src), str(tmp_path / "bf16"), dtype="bf16")
    fp32 = os.path.getsize(consolidate(str(src), str(tmp_path / "fp32"), dtype="fp32")[0])
    first = sum(_pages(os.path.getsize(f)) for f in bf16)
    # room for the bf16 output and half the fp32 one: enough to replace one by the other after
    # deleting it, not to write the new one beside it
    with small_disk(tmp_path / "disk", first + _pages(fp32 // 2) + PAGE) as disk:
        disk.enter()
        out = os.path.join(disk.path, "out")
        consolidate(str(src), out, dtype="bf16")
        before = {f: Path(out, f).read_bytes() for f in os.listdir(out)}
        with pytest.raises(DiskFullError, match=FULL) as caught:
            consolidate(str(src), out, dtype="fp32")
        path, needed, free = re.search(FULL, str(caught.value)).groups()
        assert path == out and int(needed) >= fp32 and int(free) < int(needed)
        assert {f: Path(out, f).read_bytes() for f in os.listdir(out)} == before  # the earlier output, whole
        assert _leftovers(out) == []
        assert cli(["consolidate", str(src), out, "--dtype", "fp32"]) == 2  # the CLI: one line, exit 2
        assert re.fullmatch(f"hf_zero: {FULL}\n", capsys.readouterr().err)
        assert {f: Path(out, f).read_bytes() for f in os.listdir(out)} == before and _leftovers(out) == []
