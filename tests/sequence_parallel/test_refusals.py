"""What sequence parallelism refuses, and the batch split, on one process (no ranks)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from hf_zero.config import load_config, resolve_config
from hf_zero.config.errors import ConfigError
from hf_zero.sequence_parallel import check_heads, check_size, split_batch
from tests.sequence_parallel.models import SEQ, lm_batch


def _config(heads: int, kv: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=16 * heads, num_attention_heads=heads, num_key_value_heads=kv)


@pytest.mark.parametrize("heads,kv,size", [(4, 2, 2), (4, 4, 4), (4, 2, 4), (8, 1, 8), (8, 2, 4)])
def test_heads_that_split(heads, kv, size):
    check_heads(_config(heads, kv), size)


@pytest.mark.parametrize("heads,kv,size,words", [
    (4, 2, 3, ["num_attention_heads = 4", "sequence_parallel_size = 3"]),
    (12, 3, 4, ["num_key_value_heads = 3", "sequence_parallel_size = 4"]),
])
def test_heads_that_do_not_split_are_named(heads, kv, size, words):
    with pytest.raises(ValueError) as caught:
        check_heads(_config(heads, kv), size)
    assert all(w in str(caught.value) for w in words), caught.value


def test_size_must_divide_the_world():
    assert check_size(2, 4) == 2
    with pytest.raises(ValueError, match=r"sequence_parallel_size = 3 does not divide the world size 4.*\[1, 2, 4\]"):
        check_size(3, 4)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        check_size(0, 4)


class _Args:
    per_device_train_batch_size = 2
    gradient_accumulation_steps = 1
    max_grad_norm = 1.0
    learning_rate = 1e-3


def test_resolve_fills_from_the_trainer_and_refuses_what_disagrees():
    auto = load_config({"zero_optimization": {"stage": 1}}, source="ds.json")
    resolved = resolve_config(auto, _Args(), world_size=4, sequence_parallel_size=2)
    assert resolved.sequence_parallel_size == 2
    assert resolved.train_batch_size == 2 * 1 * 2  # micro * accumulation * (world / sp)
    assert resolve_config(auto, _Args(), world_size=4).sequence_parallel_size == 1
    fixed = load_config({"zero_optimization": {"stage": 1}, "sequence_parallel_size": 4}, source="ds.json")
    with pytest.raises(ConfigError, match="sequence_parallel_size = 4 in ds.json but TrainingArguments.parallelism"):
        resolve_config(fixed, _Args(), world_size=4, sequence_parallel_size=2)
    with pytest.raises(ConfigError, match="sequence_parallel_size = 4 does not divide world_size = 6"):
        resolve_config(fixed, _Args(), world_size=6)
    batch = load_config({"sequence_parallel_size": 2, "train_batch_size": 8}, source="ds.json")
    with pytest.raises(ConfigError, match=r"world_size / sequence_parallel_size \(2\) = 4"):
        resolve_config(batch, _Args(), world_size=4)


def test_split_shifts_on_the_whole_sequence():
    batch = lm_batch(0, 0)
    halves = [split_batch(batch, 2, rank) for rank in (0, 1)]
    half = SEQ // 2
    for rank, part in enumerate(halves):
        assert set(part) == {"input_ids", "labels", "shift_labels", "position_ids"}  # the mask is dropped
        assert torch.equal(part["input_ids"], batch["input_ids"][:, rank * half:(rank + 1) * half])
        assert torch.equal(part["position_ids"][0], torch.arange(rank * half, (rank + 1) * half))
        assert torch.equal(part["labels"], part["shift_labels"])
    # the last token of slice 0 predicts the first token of slice 1; the last of the sequence nothing
    assert torch.equal(halves[0]["shift_labels"][:, -1], batch["labels"][:, half])
    assert (halves[1]["shift_labels"][:, -1] == -100).all()
    whole = torch.cat([h["shift_labels"] for h in halves], dim=1)
    assert torch.equal(whole[:, :-1], batch["labels"][:, 1:])


def test_split_refuses_what_it_cannot_cut():
    batch = lm_batch(0, 0)
    with pytest.raises(ValueError, match="sequence length 32 does not split over 3 ranks.*pad_to_multiple_of=3"):
        split_batch(batch, 3, 0)
    left = dict(batch, attention_mask=batch["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="left padding"):
        split_batch(left, 2, 0)
    packed = dict(batch, position_ids=torch.cat([torch.arange(16), torch.arange(16)]).expand(2, -1))
    with pytest.raises(NotImplementedError, match="packed sequences"):
        split_batch(packed, 2, 0)
    with pytest.raises(ValueError, match="needs input_ids and labels"):
        split_batch({"input_ids": batch["input_ids"]}, 2, 0)
