"""``hf-zero consolidate``: hf_zero and DeepSpeed sharded checkpoints to HF safetensors that plain
``from_pretrained`` loads, streamed (peak memory about one tensor), with clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from hf_zero.checkpoint.deepspeed_format import DeepSpeedCheckpoint
from hf_zero.checkpoint.consolidate import ConsolidateError, consolidate, parse_size
from hf_zero.cli import main as cli
from hf_zero.testing.multiprocess import run_on_ranks

DS_DATA = Path(__file__).resolve().parents[1] / "data" / "deepspeed_ckpt"
DS_CASES = {c["path"]: c for c in json.loads((DS_DATA / "manifest.json").read_text())["cases"]}


def _tiny_config(tie: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)


def _train(rank, world, out, stage, tie):
    import hf_zero.trainer as zt

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(tie))
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (16, 12), generator=g)]
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=2, save_steps=2,
                             per_device_train_batch_size=2, learning_rate=1e-2, disable_tqdm=True, seed=0)
    zt.activate({"zero_optimization": {"stage": stage}})
    try:
        Trainer(model=model, args=args, train_dataset=data).train()
    finally:
        zt.deactivate()


def _logits(path: str) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        return model(torch.arange(12).view(1, 12)).logits


@pytest.mark.parametrize("stage,tie", [(2, True), (3, False)])
def test_hf_zero_checkpoint_consolidates_to_what_the_trainer_saved(tmp_path, stage, tie):
    run_on_ranks(_train, 2, tmp_path / "run", stage, tie, timeout=300)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert cli(["consolidate", str(ckpt), str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    ours, trainers = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert sorted(ours) == sorted(trainers)
    for name in trainers:
        assert torch.equal(ours[name], trainers[name]), name
    assert torch.equal(_logits(str(tmp_path / "out")), _logits(str(ckpt)))
    # bf16 output, split into numbered shards with an index
    consolidate(str(ckpt / "hf_zero_sharded"), str(tmp_path / "bf16"), dtype="bf16", max_shard_size="10KB")
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    for name, tensor in model.state_dict().items():
        if name in trainers:
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, trainers[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("path", ["stage1/tied", "stage2/untied", "stage3/tied", "stage3/untied"])
def test_deepspeed_checkpoint_consolidates(tmp_path, path):
    case = DS_CASES[path]
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=66, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         tie_word_embeddings=case["tie"], mlp_bias=case["mlp_bias"])
    src = tmp_path / "ckpt"
    shutil.copytree(DS_DATA / path, src)
    config.save_pretrained(str(src))  # as the Trainer leaves it beside DeepSpeed's folders
    written = consolidate(str(src), str(tmp_path / "out"))
    assert str(tmp_path / "out" / "config.json") in written
    reference = load_file(str(src / "reference_fp32.safetensors"))
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    aliases = DeepSpeedCheckpoint(str(src)).tied_aliases()  # tied copies are left out, as HF does
    for name, tensor in reference.items():
        assert torch.equal(written[aliases.get(name, name)], tensor), name
    # the fixture's model carries an extra buffer (model.marker) that LlamaForCausalLM lacks
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    for name, tensor in model.state_dict().items():
        if name in reference:
            assert torch.equal(tensor, reference[name]), name


def test_consolidate_errors_name_the_input(tmp_path):
    with pytest.raises(ConsolidateError, match="no such checkpoint folder"):
        consolidate(str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConsolidateError, match="is neither an hf_zero checkpoint"):
        consolidate(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(ConsolidateError, match="--dtype 'int8': allowed values are fp32, bf16, fp16"):
        consolidate(str(DS_DATA / "stage2/tied"), str(tmp_path / "out"), dtype="int8")
    with pytest.raises(ConsolidateError, match="--max_shard_size 'big'"):
        consolidate(str(DS_DATA / "stage2/tied"), str(tmp_path / "out"), max_shard_size="big")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100") == 100
    assert not (tmp_path / "out").exists()  # nothing written before the checks


_MEASURE = r"""
import resource, sys, json
import torch
from hf_zero.checkpoint.deepspeed_format import DeepSpeedCheckpoint
from hf_zero.checkpoint.consolidate import consolidate
import hf_zero.checkpoint.sharded, safetensors.torch, torch.distributed.checkpoint  # imports before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
consolidate(sys.argv[1], sys.argv[2], dtype="fp32")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "after": after}))
"""


def _big_checkpoint(path: Path) -> tuple[int, int]:
    """A W = 1 hf_zero checkpoint of a ~100 MB fp32 model; returns (model bytes, largest tensor bytes)."""
    from hf_zero.checkpoint import sharded
    from hf_zero.engine import ZeroEngine

    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=24,
                         num_attention_heads=4, num_key_value_heads=4)
    model = AutoModelForCausalLM.from_config(config)
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters()), stage=2, bucket_numel=2**24)
    sharded.save(engine, str(path))
    sizes = [p.numel() * 4 for p in model.parameters()]
    return sum(sizes), max(sizes)


def test_consolidate_streams_with_memory_about_one_tensor(tmp_path):
    total, largest = _big_checkpoint(tmp_path / "ckpt")
    assert total > 90 * 2**20
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "ckpt"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = rss["after"] - rss["before"]
    # one tensor read + its cast copy + write buffer, plus allocator slack: far below the model
    assert grew <= 4 * largest + 24 * 2**20, (grew, largest, total)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sum(t.numel() * 4 for t in out.values()) == total


def _lora_run(rank, world, out):
    import hf_zero.trainer as zt
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(_tiny_config(True)),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (8, 12))]
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=1, save_steps=1,
                             per_device_train_batch_size=2, disable_tqdm=True)
    zt.activate({"zero_optimization": {"stage": 2}})
    try:
        Trainer(model=model, args=args, train_dataset=data).train()
    finally:
        zt.deactivate()


def test_a_lora_checkpoint_is_refused_with_where_the_adapter_is(tmp_path):
    run_on_ranks(_lora_run, 1, tmp_path / "run", timeout=120)
    with pytest.raises(ConsolidateError, match="PEFT \\(LoRA\\) run.*adapter_model.safetensors"):
        consolidate(str(tmp_path / "run" / "checkpoint-1"), str(tmp_path / "out"))
