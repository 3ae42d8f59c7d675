"""hf_zero's progress bars (hf_zero/progress.py), through ``hf-zero consolidate`` and NVMe set-up: drawn by rank 0,
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


def _nvme_engine(nvme_path):
    import torch

    from hf_zero.engine import ZeroEngine
    from hf_zero.engine.offload.settings import OptimizerOffload, ParamOffload
    from tests.engine.models import tiny_llama

    model = tiny_llama(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return ZeroEngine(model, opt, stage=3, bucket_numel=3000,
                      offload=OptimizerOffload("nvme", chunk_numel=1500, nvme_path=nvme_path),
                      offload_param=ParamOffload("nvme", nvme_path=nvme_path))


def test_nvme_set_up_bars(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    for name, bars_on in (("on", True), ("off", False)):
        (tmp_path / name).mkdir()
        err = io.StringIO()
        if not bars_on:
            hf_logging.disable_progress_bar()
        try:
            with redirect_stderr(err):
                _nvme_engine(str(tmp_path / name)).close()
        finally:
            hf_logging.enable_progress_bar()
        for desc in ("Writing parameter shards to NVMe", "Writing fp32 masters to NVMe"):
            assert (desc in err.getvalue()) is bars_on, (name, err.getvalue())
