"""A full disk never costs the earlier output, and says so in one line: ``No space left on device
writing PATH (N bytes needed, M free)``, from ``consolidate``, ``save_model`` at every stage (the
stage-3 streamed save, the Trainer's own save at stages 1-2, the stage-3 full-gather fallback) and
the sharded checkpoint save (where DCP would wrap it as ``CheckpointException``). A save killed
after writing leaves the earlier output too, and the next save removes what it left."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Trainer, TrainingArguments

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
        err = capsys.readouterr().err  # the progress bar (rank 0, on stderr), then the one error line
        assert err.endswith("\n") and err.count("hf_zero:") == 1, err
        assert re.fullmatch(f"hf_zero: {FULL}", err.splitlines()[-1]), err
        assert {f: Path(out, f).read_bytes() for f in os.listdir(out)} == before and _leftovers(out) == []


def _config(kind: str = "llama"):
    if kind == "mixtral":  # its fused experts cannot be streamed: stage 3 gathers the full model (the fallback)
        return MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                             num_experts_per_tok=2, tie_word_embeddings=False)
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


def _model_bytes(tmp_path, kind: str = "llama") -> int:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(kind)).save_pretrained(str(tmp_path / "size"))
    return os.path.getsize(tmp_path / "size" / "model.safetensors")


def _header_bytes(file) -> int:
    with open(file, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def _files(folder) -> dict[str, bytes]:
    return {f: Path(folder, f).read_bytes() for f in sorted(os.listdir(folder)) if Path(folder, f).is_file()}


def _train_and_save(rank, world, disk, stage, save_steps, kind="llama"):
    """One step on the small disk; then the model is saved twice (changed in between)."""
    import hf_zero.trainer as zt

    disk.enter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind))
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
        before = _files(out) if rank == 0 else {}  # rank 0 writes (at stages 1-2 the others may not wait for it)
        with torch.no_grad(), zt.session_of(trainer).engine.gathered(modifier_rank=0):
            for p in model.parameters():
                p.add_(1.0)
        try:
            trainer.save_model(out)
        except DiskFullError as error:
            if rank != 0:
                return "save", str(error), None
            return "save", str(error), (_files(out) == before, "model.safetensors" in before, _leftovers(out))
        return "no error", "", None
    finally:
        zt.deactivate()


@pytest.mark.parametrize("stage, kind", [(3, "llama"), (3, "mixtral"), (2, "llama"), (1, "llama")],
                         ids=["stage3-streamed", "stage3-gathered", "stage2", "stage1"])
def test_save_model_over_an_earlier_one_keeps_it_when_the_disk_fills(tmp_path, stage, kind):
    size = _model_bytes(tmp_path, kind)
    # room for one saved model and half of another, besides the small files
    with small_disk(tmp_path / "disk", _pages(size) + _pages(size // 2) + 24 * PAGE) as disk:
        results = run_on_ranks(_train_and_save, 2, disk, stage, 0, kind, timeout=120)
    out = os.path.join(disk.path, "model")
    # stage 3 (a collective): every rank raises the writer's error; stages 1-2: the writer alone
    raising = results if stage == 3 else results[:1]
    if stage != 3:
        assert results[1] == ("no error", "", None)
    # the bytes needed: the whole file; the gathered save counts the model's own tensors, whose
    # safetensors header differs from that of the layout written (experts per expert): its data bytes
    least = size if kind != "mixtral" else size - 8 - _header_bytes(tmp_path / "size" / "model.safetensors")
    for where, message, _ in raising:
        assert where == "save" and message == results[0][1]
        path, needed, free = re.search(FULL, message).groups()
        assert path == out and int(needed) >= least and int(free) < int(needed)
    # the earlier save whole (weights, config, training arguments), no temporary file left
    assert results[0][2] == (True, True, [])


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


def _save_once(rank, world, out, seed, kill):
    """Stage 2 on one rank, a model of ``seed`` trained one step and saved into ``out``; ``kill``:
    the process is killed (SIGKILL) once the Trainer's ``_save`` has written every file, before
    they are swapped in."""
    import signal

    import hf_zero.trainer as zt

    class KilledAfterWriting(Trainer):
        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict)
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config())
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))]
    args = TrainingArguments(output_dir=os.path.join(os.path.dirname(out), "run"), use_cpu=True, report_to="none",
                             max_steps=1, save_strategy="no", per_device_train_batch_size=2, disable_tqdm=True, seed=0)
    zt.activate({"zero_optimization": {"stage": 2}})
    try:
        trainer = KilledAfterWriting(model=model, args=args, train_dataset=data)
        trainer.train()
        trainer.save_model(out)
    finally:
        zt.deactivate()


def test_a_save_model_killed_before_the_swap_leaves_the_earlier_one(tmp_path):
    out = str(tmp_path / "model")
    run_on_ranks(_save_once, 1, out, 0, False, timeout=120)
    before = _files(out)
    with pytest.raises(RankFailure):
        run_on_ranks(_save_once, 1, out, 1, True, timeout=120)
    assert _files(out) == before  # weights, config and training arguments as the first save left them
    (left,) = _leftovers(out)  # the killed save's hidden folder, with every file it wrote
    assert left.startswith(".hf_zero-stage.") and "model.safetensors" in os.listdir(os.path.join(out, left))
    run_on_ranks(_save_once, 1, out, 2, False, timeout=120)  # the next save removes it
    assert _leftovers(out) == [] and _files(out)["model.safetensors"] != before["model.safetensors"]
