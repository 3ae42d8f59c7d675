"""fp16 params with fp32 master shards and torch's ShardedGradScaler, on CPU gloo ranks.

An overflow on ONE rank must make EVERY rank skip the step and halve the scale (the found-inf
flag is all-reduced); steps without overflow must train like an fp32 reference started from the
same fp16-rounded weights, to fp16 precision."""

from __future__ import annotations

import copy

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.nn.parallel import DistributedDataParallel as DDP

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import batch, tiny_llama


def _fp16(rank, world):
    ref = tiny_llama(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
    model = copy.deepcopy(ref)
    ddp = DDP(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=2000, param_dtype=torch.float16)
    wrapped = ZeroModule(model, engine)
    scaler = ShardedGradScaler(device="cpu", init_scale=2.0**10, growth_interval=1000)
    vocab = ref.config.vocab_size
    scales, skipped = [], []
    for step in range(4):
        inputs = batch(rank, step, 0, vocab)
        before = [p.detach().clone() for p in model.parameters()]
        loss = wrapped(**inputs).loss.float()
        scaler.scale(loss).backward()
        engine.finish_grad_sync()
        if step == 1 and rank == world - 1:
            # An overflow that lands in the last rank's shard only: the other ranks' shards are finite.
            engine.grad_sync.buckets[0].main_grad[0] = float("inf")
        scaler.unscale_(opt)
        engine.clip_grad_norm_(float("inf"))
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        wrapped.zero_grad()
        did_skip = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        skipped.append(did_skip)
        scales.append((scale_before, scaler.get_scale()))
        if step != 1:  # the reference skips the overflowing step too
            ddp(**inputs).loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        rel = ((p.float() - q).norm() / q.norm()).item()
        assert rel < 5e-3, rel
    return skipped, scales


def test_overflow_on_one_rank_skips_everywhere():
    results = run_on_ranks(_fp16, 2, timeout=240)
    for skipped, scales in results:
        assert skipped == [False, True, False, False]
        assert scales[1] == (2.0**10, 2.0**9)  # halved by the overflow
        assert scales[2][0] == 2.0**9
    assert results[0] == results[1]
