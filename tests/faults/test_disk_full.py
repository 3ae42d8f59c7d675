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


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


def _model_bytes(tmp_path) -> int:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config()).save_pretrained(str(tmp_path / "size"))
    return os.path.getsize(tmp_path / "size" / "model.safetensors")


def _train_and_save(rank, world, disk, stage, save_steps):
    """One step on the small disk; stage 3 then saves the model twice (changed in between)."""
    import hf_zero.trainer as zt

    disk.enter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config())
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(3))]
    args = TrainingArguments(output_dir=os.path.join(disk.path, "run"), use_cpu=True, report_to="none", max_steps=1,
                             save_steps=save_steps, save_strategy="steps" if save_steps else "no",
                             per_device_train_batch_size=2, learning_rate=1e-2, disable_tqdm=True, seed=0)
    zt.activate({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, "comm_timeout_s": 30})
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        try:
            trainer.train()
        except DiskFullError as error:
            return "train", str(error), sorted(os.listdir(os.path.join(disk.path, "run", "checkpoint-1")))
        out = os.path.join(disk.path, "model")
        trainer.save_model(out)
        before = Path(out, "model.safetensors").read_bytes()
        with torch.no_grad(), zt.session_of(trainer).engine.gathered(modifier_rank=0):
            for p in model.parameters():
                p.add_(1.0)
        try:
            trainer.save_model(out)
        except DiskFullError as error:
            return "save", str(error), (Path(out, "model.safetensors").read_bytes() == before, _leftovers(out))
        return "no error", "", None
    finally:
        zt.deactivate()


def test_streamed_save_over_an_earlier_one_keeps_it_when_the_disk_fills(tmp_path):
    size = _model_bytes(tmp_path)
    # room for one saved model and half of another, besides the small files
    with small_disk(tmp_path / "disk", _pages(size) + _pages(size // 2) + 24 * PAGE) as disk:
        results = run_on_ranks(_train_and_save, 2, disk, 3, 0, timeout=120)
    out = os.path.join(disk.path, "model")
    for where, message, (intact, leftovers) in results:  # every rank raises the writer's error
        assert where == "save" and message == results[0][1]
        path, needed, free = re.search(FULL, message).groups()
        assert path == out and int(needed) >= size and int(free) < int(needed)
    assert results[0][2] == (True, [])  # the earlier save whole, no temporary file left


def test_sharded_checkpoint_save_reports_a_full_disk_not_a_checkpoint_exception(tmp_path):
    size = _model_bytes(tmp_path)
    # room for the model weights, not for fp32 masters + two Adam moments besides them
    with small_disk(tmp_path / "disk", 2 * _pages(size) + 24 * PAGE) as disk:
        results = run_on_ranks(_train_and_save, 2, disk, 2, 1, timeout=120)
    for where, message, files in results:
        assert where == "train"
        path, needed, free = re.search(FULL, message).groups()
        assert path == os.path.join(disk.path, "run", "checkpoint-1", "hf_zero_sharded"), path
        assert int(needed) > int(free)
        assert "hf_zero_complete.json" not in files and "model.safetensors" in files
