"""[Note: clip in the step] (hf_zero/engine/clip_in_step.py): with a fused torch optimizer the
clip coefficient rides on the optimizer's ``grad_scale`` instead of a pass over the grads. The
result is the reference (torch's clip_grad_norm_ then the same fused step) to rounding, the
grads are left unscaled until the step reads them, nothing is left on the optimizer, a skipped
step does not carry the coefficient over, and a GradScaler's step still clips (fp16, its
found_inf skip included)."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_zero.engine import ZeroEngine, ZeroModule, clip_in_step
from hf_zero.testing.multiprocess import run_on_ranks
from hf_zero.trainer.loss_scaling import ShardedDeepSpeedScaler
from tests.engine.models import batch, tiny_llama

MAX_NORM = 0.05  # far below the tiny model's norm: clipping fires at every step


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _clipped_steps(rank, world, stage, skip_step, twice=False):
    ref = tiny_llama(0)
    model = copy.deepcopy(ref)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=3000)
    wrapped = ZeroModule(model, engine)
    vocab = ref.config.vocab_size
    seen = []
    for step in range(4):
        inputs = batch(0, step, 0, vocab)  # every rank the same batch: the reference is one process
        wrapped(**inputs).loss.backward()
        engine.finish_grad_sync()
        before = [g.clone() for g in engine._grad_shards()]
        norm = engine.clip_grad_norm_(MAX_NORM)
        # The grads are not touched by the clip: the step divides them by grad_scale as it reads them.
        seen.append(all(torch.equal(a, g) for a, g in zip(before, engine._grad_shards()))
                    and isinstance(getattr(opt, "grad_scale", None), torch.Tensor))
        if step == skip_step:  # e.g. a Trainer that skips the step: the coefficient must not linger
            wrapped.zero_grad()
            assert getattr(opt, "grad_scale", None) is None
            continue
        ref(**inputs).loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        assert abs(norm.item() - ref_norm.item()) <= 1e-5 * ref_norm.item()
        if twice:  # a second clip sees the clipped grads, as torch's does: about a no-op
            again, ref_again = engine.clip_grad_norm_(MAX_NORM), torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
            assert abs(again.item() - ref_again.item()) <= 1e-5 * ref_again.item(), (again, ref_again)
            assert abs(again.item() - MAX_NORM) <= 1e-4 * MAX_NORM
        assert ref_norm.item() > 10 * MAX_NORM  # the clip fired
        ref_opt.step(); ref_opt.zero_grad()
        opt.step()
        assert getattr(opt, "grad_scale", None) is None  # removed by the post-step hook
        wrapped.zero_grad()
    with engine.gathered():
        worst = max(_rel(p.detach(), q.detach()) for p, q in zip(model.parameters(), ref.parameters()))
    engine.close()
    return seen, worst


@pytest.mark.parametrize("stage,world", [(1, 1), (2, 2), (3, 2)])
def test_clip_rides_on_the_fused_step_and_matches_torch(stage, world):
    for seen, worst in run_on_ranks(_clipped_steps, world, stage, 1):
        assert all(seen)
        assert worst < 1e-5, worst


@pytest.mark.parametrize("stage", [1, 3])
def test_a_second_clip_in_the_step_sees_the_clipped_grads(stage):
    for _, worst in run_on_ranks(_clipped_steps, 1, stage, None, True):
        assert worst < 1e-5, worst


def test_applies_only_to_fused_optimizers_with_nothing_else_on_grad_scale():
    p = torch.nn.Parameter(torch.zeros(3))
    assert clip_in_step.applies(torch.optim.AdamW([p], fused=True))
    assert not clip_in_step.applies(torch.optim.AdamW([p], foreach=True))
    assert not clip_in_step.applies(torch.optim.RMSprop([p]))
    busy = torch.optim.SGD([p], lr=0.1, fused=True)
    busy.grad_scale = torch.tensor(2.0)  # a GradScaler is inside this step
    assert not clip_in_step.applies(busy)
    assert not clip_in_step.applies(None)


def _fp16_with_scaler(rank, world):
    """GradScaler.step keeps an optimizer's own grad_scale once the grads are unscaled (it takes the
    product) and adds found_inf: the clip still applies, and an overflow still skips (hf_zero's
    sharded scaler: [Note: fused steps under the sharded scaler] in loss_scaling.py)."""
    model = tiny_llama(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=2000, param_dtype=torch.float16)
    wrapped = ZeroModule(model, engine)
    scaler = ShardedDeepSpeedScaler(device="cpu", init_scale=2.0**10, growth_interval=1000, hysteresis=1, min_scale=1.0)
    out = []
    for step in range(3):
        masters = [m.clone() for m in engine.masters]
        loss = wrapped(**batch(rank, step, 0, model.config.vocab_size)).loss.float()
        scaler.scale(loss).backward()
        engine.finish_grad_sync()
        if step == 1:
            engine.grad_sync.buckets[0].main_grad[0] = float("inf")
        scaler.unscale_(opt)
        grads = [g.clone() for g in engine._grad_shards()]
        norm = engine.clip_grad_norm_(MAX_NORM)
        scaler.step(opt)
        scaler.update()
        stepped = step != 1  # hf_zero's scaler does not call an overflowed step: the clip stays until zero_grad
        assert getattr(opt, "found_inf", None) is None
        assert (getattr(opt, "grad_scale", None) is None) == stepped  # a skipped step's: until zero_grad
        # The first AdamW step moves each element by about lr * sign(grad) whatever the grad's size,
        # so compare the applied grads instead: the step's exp_avg is (1 - beta1) * applied grad.
        if step == 0:
            coef = min(1.0, MAX_NORM / (norm.item() + 1e-6))
            state = [opt.state[p]["exp_avg"] for g in opt.param_groups for p in g["params"] if p in opt.state]
            applied = torch.cat([s.flatten() for s in state]) / 0.1
            assert state and coef < 0.1
            expected = torch.cat([g.flatten() for g in grads]) * coef
            out.append(abs(applied.norm().item() / expected.norm().item() - 1) < 1e-5)
        if step == 1:
            out.append(all(torch.equal(a, b) for a, b in zip(masters, engine.masters)))  # skipped
        wrapped.zero_grad()
        assert getattr(opt, "grad_scale", None) is None
    engine.close()
    return out


def test_a_grad_scaler_step_keeps_the_clip_and_its_overflow_skip():
    for out in run_on_ranks(_fp16_with_scaler, 2):
        assert out == [True, True]


def _leftovers(rank, world):
    model = tiny_llama(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=3000)
    wrapped = ZeroModule(model, engine)
    out = []
    for case in ("raised", "replaced"):
        wrapped(**batch(0, 0, 0, model.config.vocab_size)).loss.backward()
        engine.clip_grad_norm_(MAX_NORM)
        if case == "raised":  # a step that raised inside a GradScaler's step leaves found_inf behind
            opt.found_inf = torch.zeros(())
        else:  # someone else's grad_scale (a scaler's product): not ours to remove
            opt.grad_scale = torch.tensor(3.0)
        wrapped.zero_grad()
        out.append(getattr(opt, "grad_scale", None))
        for name in ("grad_scale", "found_inf"):
            if hasattr(opt, name):
                delattr(opt, name)
    engine.close()
    return out


def test_zero_grad_takes_back_only_its_own_grad_scale():
    ((raised, replaced),) = run_on_ranks(_leftovers, 1)
    assert raised is None  # ours, left by a step that raised: gone at zero_grad
    assert replaced is not None and replaced.item() == 3.0
