"""ZeRO-1/2 engine vs DDP + the same torch optimizer, step by step (fp32, CPU gloo ranks).

Rank starts: the ``_parity`` runs of one world size share one start, made once for the module
(``parity``); each run builds its own models, DDP and engine, and checks itself at every step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.testing.multiprocess import run_each, run_on_ranks
from tests.engine.models import add_frozen_and_unused, batch, tiny_llama

STEPS = 10
RTOL = 1e-5


def _optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    # The unused param decays: a param without gradient must be skipped by the optimizer, as under DDP.
    decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() > 1 or n == "unused_bias")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1 and n != "unused_bias"]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=1e-2, foreach=True)
    if kind == "adamw_fused":
        return torch.optim.AdamW(groups, lr=1e-2, fused=True)
    return torch.optim.SGD(groups, lr=5e-2, momentum=0.9)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _parity(rank, world, stage, grad_accum, optim, bucket_numel, tied):
    ref = add_frozen_and_unused(tiny_llama(0, tied=tied))
    zero_model = copy.deepcopy(ref)
    ddp = DDP(ref, find_unused_parameters=True)
    ref_opt = _optimizer(ref, optim)
    opt = _optimizer(zero_model, optim)
    engine = ZeroEngine(zero_model, opt, stage=stage, bucket_numel=bucket_numel)
    wrapped = ZeroModule(zero_model, engine)
    vocab = ref.config.vocab_size
    report = []
    for step in range(STEPS):
        losses = []
        for micro in range(grad_accum):
            inputs = batch(rank, step, micro, vocab)
            last = micro == grad_accum - 1
            ctx_ref = ddp.no_sync() if not last else torch.enable_grad()
            with ctx_ref:
                loss_ref = ddp(**inputs).loss / grad_accum
                loss_ref.backward()
            ctx = wrapped.no_sync() if not last else torch.enable_grad()
            with ctx:
                loss = wrapped(**inputs).loss / grad_accum
                loss.backward()
            losses.append((loss.item(), loss_ref.item()))
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        norm = engine.clip_grad_norm_(1.0)
        ref_opt.step(); ref_opt.zero_grad()
        opt.step(); wrapped.zero_grad()
        for a, b in losses:
            assert abs(a - b) <= RTOL * abs(b), (step, a, b)
        assert abs(norm.item() - norm_ref.item()) <= RTOL * norm_ref.item(), (step, norm, norm_ref)
        with engine.gathered():  # stage 3 keeps shards between uses
            for (name, p), q in zip(zero_model.named_parameters(), ref.parameters()):
                assert _rel(p.detach(), q.detach()) <= RTOL, (step, name, _rel(p, q))
        report.append(norm.item())
    counts = engine.ctx.take_counts()
    engine.close()
    return report, counts, len([b for buf in engine.buffers for b in buf.buckets])


# Every _parity run of the module, by world size: {key: (stage, grad_accum, optim, bucket_numel, tied)}.
RUNS = {
    1: {("adamw", stage): (stage, 1, "adamw", 2000, True) for stage in (1, 2, 3)},
    2: {**{("adamw", stage): (stage, 1, "adamw", 2000, True) for stage in (1, 2, 3)},
        **{("sgd_accum_untied", stage): (stage, 4, "sgd", 3000, False) for stage in (1, 2, 3)},
        "fused_adamw_one_bucket": (2, 4, "adamw_fused", 10**9, True),
        # test_collective_counts: many params per bucket, and one bucket per param
        **{("counts", stage, bucket_numel): (stage, 4, "sgd", bucket_numel, True)
           for stage in (1, 2) for bucket_numel in (4000, 1)}},
    4: {("adamw", stage): (stage, 1, "adamw", 2000, True) for stage in (1, 2, 3)},
}


@pytest.fixture(scope="module")
def parity():
    """Per world size of ``RUNS``: every rank's results of its runs, one rank start per world size. Every
    run checks losses, grad norms and params against DDP at each step inside the ranks."""
    return {world: run_on_ranks(run_each, world, _parity, runs, timeout=600) for world, runs in RUNS.items()}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_parity_adamw(world, stage, parity):
    results = [ranks[("adamw", stage)] for ranks in parity[world]]
    norms = [r[0] for r in results]
    assert all(n == norms[0] for n in norms), "ranks disagree on the grad norm"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_parity_grad_accum_untied_sgd(stage, parity):
    assert all(("sgd_accum_untied", stage) in ranks for ranks in parity[2])  # ran, checked inside the ranks


def test_parity_fused_adamw_one_bucket(parity):
    assert all("fused_adamw_one_bucket" in ranks for ranks in parity[2])  # ran, checked inside the ranks


@pytest.mark.parametrize("stage,expected_rs_per_step", [(1, 1), (2, 4)])
def test_collective_counts(stage, expected_rs_per_step, parity):
    """Per optimizer step: one reduce-scatter per bucket per communicating backward (stage 1 only on
    the boundary of 4 micro-steps, stage 2 on each), one all-gather per bucket, two all-reduces (the
    clipping norm, and which params got a gradient on any rank)."""
    _, counts, n_buckets = parity[2][0][("counts", stage, 4000)]
    assert n_buckets > 1
    assert counts["reduce_scatter"] == STEPS * expected_rs_per_step * n_buckets
    assert counts["all_gather"] == STEPS * n_buckets
    assert counts["all_reduce"] == 2 * STEPS
    # bucketing really reduces collectives: far fewer than one per parameter
    _, counts_small, n_small = parity[2][0][("counts", stage, 1)]
    assert n_small > 3 * n_buckets
    assert counts_small["all_gather"] == STEPS * n_small


def _bf16_params(rank, world):
    """bf16 params with fp32 master shards: the master moves like an fp32 reference model
    started from the bf16-rounded weights, and the params are its bf16 rounding."""
    ref = tiny_llama(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())  # the engine's master starts from the rounded weights
    model = copy.deepcopy(ref)
    ddp = DDP(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=2000, param_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    inputs = batch(rank, 0, 0, ref.config.vocab_size)
    for step in range(3):
        ddp(**inputs).loss.backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**inputs).loss.backward()
        ref_opt.step(); ref_opt.zero_grad()
        opt.step()
    # bf16 forward/backward: gradients agree to bf16 precision, so params do to ~1e-2 relative
    for p, q in zip(model.parameters(), ref.parameters()):
        assert _rel(p.detach().float(), q.detach()) < 2e-2
    masters_numel = sum(m.numel() for m in engine.masters)
    assert all(m.dtype == torch.float32 for m in engine.masters)
    return masters_numel


def test_bf16_params_fp32_master():
    run_on_ranks(_bf16_params, 2, timeout=240)
