"""Bytes per rank, measured from the tensors the engine holds, against the ZeRO formula.

For a fp32 model with P trainable elements, AdamW state is 8 bytes per element (exp_avg and
exp_avg_sq), the master shard is the buffer itself (0 extra bytes) and the main grad shards are
fp32. With W ranks and a flat buffer of B >= P elements (B - P is alignment padding):
- optimizer state: each element's state lives on exactly one rank -> sum over ranks = 8 P,
  and each rank holds at most 8 * B / W;
- stage 2 gradients after the step: only main grad shards, 4 * B / W per rank;
- stage 1 gradients at their peak (accumulating over 2 micro-steps): the full staging buffer,
  4 * B, plus the shards;
- stage 2 gradients at their peak: the shards plus the staging of the buckets in flight: at
  most MAX_IN_FLIGHT reducing, one just launched and one filling, each at most the largest
  bucket: 4 * B / W + 4 * (MAX_IN_FLIGHT + 2) * largest bucket.
"""

from __future__ import annotations

import pytest
import torch

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.grad_sync import MAX_IN_FLIGHT
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import batch, tiny_llama


def _measure(rank, world, stage):
    model = tiny_llama(0, layers=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=1000)
    wrapped = ZeroModule(model, engine)
    for step in range(2):
        engine.reset_peak()  # the first backward stages every gradient (it fixes the layout)
        with wrapped.no_sync():  # two micro-steps: accumulate, then the boundary
            wrapped(**batch(rank, step, 0, model.config.vocab_size)).loss.backward()
        wrapped(**batch(rank, step, 1, model.config.vocab_size)).loss.backward()
        engine.finish_grad_sync()
        held_at_step = engine.held_bytes()
        opt.step()
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffer_numel = sum(b.numel for b in engine.buffers)
    largest = max(b.range.size for buf in engine.buffers for b in buf.buckets)
    return held_at_step, total, buffer_numel, largest


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [1, 2])
def test_bytes_match_zero_formula(world, stage):
    results = run_on_ranks(_measure, world, stage, timeout=240)
    total, buffer_numel = results[0][1], results[0][2]
    assert buffer_numel >= total
    held = [r[0] for r in results]
    assert sum(h["optimizer_state"] for h in held) == 8 * total
    for h in held:
        assert h["optimizer_state"] <= 8 * buffer_numel // world
        assert h["params"] == 4 * buffer_numel  # parameters stay replicated at stages 1 and 2
        assert h["grads"] == 4 * buffer_numel // world  # staging freed once reduced
        if stage == 1:
            assert h["peak_grads"] >= 4 * buffer_numel  # full gradients while accumulating
        else:
            bound = 4 * buffer_numel // world + 4 * (MAX_IN_FLIGHT + 2) * results[0][3]
            assert h["peak_grads"] <= bound < 4 * buffer_numel
