"""Stage 3 specifics: what each rank holds between steps, gathers per step, the gather context.

Units of the tiny Llama: 2 decoder layers + the root (embeddings, final norm, LM head, tied).
Per step, with no prefetch: the forward gathers every unit once (3 all-gathers), the backward
re-gathers the 2 layers (the root stays gathered from its forward to its backward), and each
unit's gradients are reduce-scattered once per backward (3)."""

from __future__ import annotations

import pytest
import torch

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import batch, tiny_llama


def _run(rank, world, edit):
    model = tiny_llama(0)
    full_numel = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = ZeroEngine(model, opt, stage=3, bucket_numel=1)
    wrapped = ZeroModule(model, engine)
    engine.ctx.take_counts()
    for step in range(3):
        wrapped(**batch(rank, step, 0, model.config.vocab_size)).loss.backward()
        engine.clip_grad_norm_(1.0)
        opt.step()
        wrapped.zero_grad()
    counts = engine.ctx.take_counts()
    held = engine.held_bytes()
    held["buffer_numel"] = sum(buf.numel for buf in engine.buffers)
    held["n_params"] = sum(len(buf.params) for buf in engine.buffers)
    sharded_between_steps = all(p.numel() == 0 for p in model.parameters())
    if edit:
        torch.set_grad_enabled(False)
        with engine.gathered(modifier_rank=0):
            if rank == 0:
                model.model.norm.weight.fill_(2.5)
        with engine.gathered():
            edited = model.model.norm.weight.detach().clone()
            model.model.norm.weight.fill_(-1.0)  # no modifier: discarded on exit
        with engine.gathered():
            kept = model.model.norm.weight.detach().clone()
        return counts, held, full_numel, sharded_between_steps, edited.tolist(), kept.tolist()
    return counts, held, full_numel, sharded_between_steps


@pytest.mark.parametrize("world", [2, 4])
def test_shards_held_and_gathers_counted(world):
    results = run_on_ranks(_run, world, False, timeout=240)
    for counts, held, full_numel, sharded in results:
        assert sharded  # between steps no full param exists
        # each rank keeps 1/W of the flat buffers; padding: < 32 per param (alignment) + < 32 W per unit
        assert held["params"] == 4 * held["buffer_numel"] // world
        assert full_numel <= held["buffer_numel"] < full_numel + 32 * held["n_params"] + 3 * 32 * world
        assert counts["all_gather"] == 3 * (3 + 2)
        assert counts["reduce_scatter"] == 3 * 3


def test_gathered_context_writes_back_from_modifier_rank():
    for *_, edited, kept in run_on_ranks(_run, 2, True, timeout=240):
        assert edited == [2.5] * len(edited)
        assert kept == edited
