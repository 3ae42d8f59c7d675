"""hf_zero's progress bars (hf_zero/progress.py), through ``hf-zero consolidate``: drawn by rank 0,
not by another rank, not with Hugging Face's progress bars off; a bar not drawn still does its work.
The sharded load and the stage-3 save on 2 ranks: tests/trainer/test_run_report.py."""

from __future__ import annotations

import io
from contextlib import redirect_stderr
from pathlib import Path

from transformers.utils import logging as hf_logging

from hf_zero.checkpoint.consolidate import consolidate
from hf_zero.progress import byte_bar, progress

CHECKPOINT = Path(__file__).resolve().parent / "data" / "deepspeed_ckpt" / "stage2" / "tied"


def _consolidate(out) -> str:
    err = io.StringIO()
    with redirect_stderr(err):
        assert consolidate(str(CHECKPOINT), str(out))
    return err.getvalue()


def test_consolidate_bar_on_rank_0_and_off_by_the_switches(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    text = _consolidate(tmp_path / "a")
    assert "Consolidating weights" in text and "100%" in text
    monkeypatch.setenv("RANK", "1")
    assert "Consolidating weights" not in _consolidate(tmp_path / "b")
    monkeypatch.setenv("RANK", "0")
    hf_logging.disable_progress_bar()
    try:
        assert "Consolidating weights" not in _consolidate(tmp_path / "c")
    finally:
        hf_logging.enable_progress_bar()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "c").iterdir())


def test_a_bar_not_drawn_still_iterates_and_counts(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    err = io.StringIO()
    with redirect_stderr(err):
        assert list(progress(range(3), desc="x")) == [0, 1, 2]
        assert list(progress(range(3), desc="x", disable=True)) == [0, 1, 2]
        with byte_bar(10, desc="y") as bar:
            bar.update(10)
    assert err.getvalue() == ""
