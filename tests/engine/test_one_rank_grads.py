"""One rank, a bf16 model: grads go straight into the fp32 main grads ([Note: one rank's grads] in
grad_sync.py), at stages 1-3, over two micro-steps (stage 1 accumulating under ``no_sync``).

Against plain autograd on a copy of the model: each param's main grad is the fp32 sum of its two
bf16 grads, bit for bit; a param without a grad (``unused_bias``) and the alignment padding are
zero, so the grad norm over the whole shards is the reference's; and no bf16 staging tensor is
ever held beside the main grads (the grads' peak is the main grads alone, 4 bytes an element,
where staging held 2 more for every bucket).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import add_frozen_and_unused, batch, tiny_llama

MICRO_STEPS = 2


def _main_grad_of(engine: ZeroEngine, param: torch.nn.Parameter) -> torch.Tensor:
    bucket, slot = engine._where[param]
    r = bucket.grad.buffer.slots[slot].range.shift(bucket.grad.bucket.range.start)
    return bucket.grad.main_grad[r.start : r.end]


def _padding(engine: ZeroEngine) -> list[torch.Tensor]:
    """Every main grad's elements outside its params' slots."""
    out = []
    for b in engine.buckets:
        g, keep = b.grad, torch.ones(b.grad.bucket.shard_size, dtype=torch.bool)
        for slot in g.bucket.slots:
            r = g.buffer.slots[slot].range.shift(g.bucket.range.start)
            keep[r.start : r.end] = False
        out.append(g.main_grad[keep])
    return out


def _check(rank, world, stage):
    model = add_frozen_and_unused(tiny_llama(0)).to(torch.bfloat16)
    reference = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = {n: torch.zeros(p.numel()) for n, p in reference.named_parameters() if p.requires_grad}
    for micro in range(MICRO_STEPS):  # each micro-step's bf16 grads, summed in fp32 in arrival order
        reference(**batch(0, 0, micro, model.config.vocab_size)).loss.backward()
        for n, p in reference.named_parameters():
            if p.grad is not None:
                expected[n] = p.grad.reshape(-1).float() if micro == 0 else expected[n] + p.grad.reshape(-1)
                p.grad = None

    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), stage=stage, bucket_numel=3000)
    wrapped = ZeroModule(model, engine)
    for micro in range(MICRO_STEPS):
        sync = micro == MICRO_STEPS - 1
        with contextlib.nullcontext() if sync else wrapped.no_sync():
            wrapped(**batch(0, 0, micro, model.config.vocab_size)).loss.backward()
    norm = engine.grad_norm()
    params = dict(model.named_parameters())
    for n in names:
        got = _main_grad_of(engine, params[n])
        assert got.dtype == torch.float32 and torch.equal(got, expected[n]), n
    assert torch.count_nonzero(expected["unused_bias"]) == 0
    assert all(torch.count_nonzero(pad) == 0 for pad in _padding(engine))
    reference_norm = torch.linalg.vector_norm(torch.cat([expected[n] for n in names]))
    torch.testing.assert_close(norm, reference_norm, rtol=1e-5, atol=0)  # a norm of per-shard norms: another order
    # The grads' peak: the fp32 main grads alone (a bf16 staging tensor would add 2 bytes an element).
    assert engine.grad_sync.peak_grad_bytes == sum(4 * b.grad.bucket.shard_size for b in engine.buckets)
    engine.close()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_rank_grads_go_straight_into_fp32_main_grads(stage):
    run_on_ranks(_check, 1, stage, timeout=120)


def _pointed_once(rank, world):
    model = tiny_llama(0)
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), stage=2, bucket_numel=3000)
    wrapped = ZeroModule(model, engine)
    pieces = [p.piece for b in engine.buckets for p in b.pieces]

    def step_grads():
        wrapped(**batch(0, 0, 0, model.config.vocab_size)).loss.backward()
        engine.finish_grad_sync()
        first = [p.grad for p in pieces]
        engine.grad_norm()  # finishes the sync again (as clipping and the step's pre-hook do)
        engine.finish_grad_sync()
        assert all(p.grad is g for p, g in zip(pieces, first)), "pieces re-pointed within one step"
        return first

    first = step_grads()
    assert all(g is not None for g in first)
    pieces[0].grad = None  # someone else cleared one: the next call points them all again
    engine.finish_grad_sync()
    assert pieces[0].grad is not None and torch.equal(pieces[0].grad, first[0])
    engine.optimizer.step()  # the post-hook clears the grads (engine.zero_grad); a second zero_grad is a no-op
    engine.zero_grad()
    assert all(p.grad is None for p in pieces)
    second = step_grads()
    assert all(g is not h for g, h in zip(first, second))
    engine.close()


def test_pieces_are_pointed_at_their_grads_once_a_step():
    """[Note: pointed once] in sharded_bucket.py: the optimizer's pieces keep the grad views set at the
    step's first finish_grad_sync; a piece cleared by someone else is pointed again; a new step gets new ones."""
    run_on_ranks(_pointed_once, 1, timeout=120)
