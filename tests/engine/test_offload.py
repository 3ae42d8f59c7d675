"""Optimizer offload to the host gives the same training as no offload (fp32, CPU gloo ranks),
keeps the offloaded masters and optimizer state off the params' device, and checkpoints.

Rank starts: the comparisons of one world size share one start, made once for the module
(``compared``), except those overlapping the next forward, whose slowed host step stays in the process:
each of those starts alone."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.host_memory import HostMemory
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.testing.multiprocess import run_each, run_on_ranks
from tests.engine.models import add_frozen_and_unused, batch, slow_host_step, tiny_llama

STEPS = 6


def _groups(model):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() > 1 or n == "unused_bias")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1 and n != "unused_bias"]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def _train(model, engine, rank, grad_accum=2, use_no_sync=True, clip=0.5):
    wrapped = ZeroModule(model, engine)
    out = []
    for step in range(STEPS):
        for micro in range(grad_accum):
            last = micro == grad_accum - 1
            with (wrapped.no_sync() if not last and use_no_sync else torch.enable_grad()):
                (wrapped(**batch(rank, step, micro, model.config.vocab_size)).loss / grad_accum).backward()
        host_step = engine._host_step
        if host_step is not None and host_step.early:
            # [Note: step in backward]: every chunk went to the worker before the optimizer step
            assert host_step._next_chunk == len(host_step.chunks) > 0
        norm = engine.clip_grad_norm_(clip) if clip else engine.grad_norm()
        engine.finish_grad_sync()  # called again (the Trainer's report does): idempotent
        held = engine.held_bytes()
        engine.optimizer.step()
        wrapped.zero_grad()
        out.append((norm.item(), held))
    with engine.gathered():
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out, params


def _compare(rank, world, stage, ratio, fused, use_no_sync=True, early=False, overlap_forward=False):
    base = add_frozen_and_unused(tiny_llama(0, tied=True))
    results = []
    if overlap_forward:
        # A slow host step: the next forward runs while chunks are still being stepped, so a
        # module (or unit gather) that did not wait for its chunk would read old params.
        slow_host_step()
    # A small chunk size: the host step pipelines several chunks of buckets (host_step.py).
    for offload in (None, OptimizerOffload("cpu", ratio=ratio, chunk_numel=5000)):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2, fused=fused, foreach=None if fused else True)
        engine = ZeroEngine(model, opt, stage=stage, bucket_numel=3000, offload=offload)
        engine.set_step_in_backward(early, overlap_forward=overlap_forward)  # no-op without offload
        results.append(_train(model, engine, rank, use_no_sync=use_no_sync, clip=None if early else 0.5))
        engine.close()
    (plain, plain_params), (off, off_params) = results
    if not fused:  # the same arithmetic in the same order: bit for bit
        assert [n for n, _ in off] == [n for n, _ in plain]  # grad norms identical
        for name in plain_params:
            assert torch.equal(off_params[name], plain_params[name]), name
    else:
        # Fused Adam(W) on the host folds the clip into its read of the grads (grad / (1/coef)
        # instead of grad * coef): the last bit of a grad may differ, nothing more.
        assert [n for n, _ in off] == pytest.approx([n for n, _ in plain], rel=1e-5)
        for name in plain_params:
            torch.testing.assert_close(off_params[name], plain_params[name], rtol=1e-5, atol=1e-6)
    held_plain, held_off = plain[-1][1], off[-1][1]
    assert held_plain["host_offload"] == 0
    assert held_off["host_offload"] > 0
    if ratio == 1.0:
        assert held_off["optimizer_state"] == 0  # masters and moments all on the host
        assert held_off["grads"] == 0  # the reduced grads went to the host as each bucket landed
    else:
        assert 0 < held_off["optimizer_state"] < held_plain["optimizer_state"] + held_plain["host_offload"]
    return held_off["host_offload"]


# The _compare runs without overlap_forward (whose slowed host step stays in its process: those start
# alone), by world size: {key: (stage, ratio, fused, use_no_sync, early)}.
RUNS = {
    1: {**{("offload", stage): (stage, 1.0, False, True, False) for stage in (1, 2, 3)},
        **{("step_in_backward", stage): (stage, 1.0, False, True, True) for stage in (1, 2, 3)}},
    2: {**{("offload", stage): (stage, 1.0, False, True, False) for stage in (1, 2, 3)},
        "accumulation_without_no_sync": (2, 1.0, False, False, False),
        "partial_fused_stage3": (3, 0.5, True, True, False),
        **{("step_in_backward", stage): (stage, 1.0, False, True, True) for stage in (1, 2, 3)},
        "step_in_backward_partial_fused_stage2": (2, 0.5, True, True, True)},
}


@pytest.fixture(scope="module")
def compared():
    """Per world size of ``RUNS``: every rank's results of its runs, one rank start per world size. Every
    run compares offload with no offload inside the ranks (``_compare``)."""
    return {world: run_on_ranks(run_each, world, _compare, runs, timeout=600) for world, runs in RUNS.items()}


def _ran(compared, world, key) -> None:
    """The run ``key`` ran on every rank at ``world``, its comparison inside the ranks passed, and it
    held host memory for the offloaded state."""
    assert all(ranks[key] > 0 for ranks in compared[world]), [ranks.get(key) for ranks in compared[world]]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_matches_no_offload(world, stage, compared):
    _ran(compared, world, ("offload", stage))


def test_offload_accumulation_without_no_sync(compared):
    # Every backward then looks like the last of the accumulation: each bucket goes to the host
    # after each micro-step, and the later parts are added up there before the step.
    _ran(compared, 2, "accumulation_without_no_sync")


def test_partial_offload_and_fused_adamw_at_stage_3(compared):
    _ran(compared, 2, "partial_fused_stage3")


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_step_in_backward_matches_no_offload(world, stage, compared):
    # No clipping: a worker steps each chunk while backward goes on ([Note: step in backward]);
    # the same arithmetic as the plain step, bit for bit, the unused param left alone.
    _ran(compared, world, ("step_in_backward", stage))


@pytest.mark.parametrize("world,stage", [(1, 2), (1, 3), (2, 2), (2, 3)])
def test_step_overlapping_the_next_forward_matches_no_offload(world, stage):
    # overlap_forward: optimizer.step() returns while the worker still steps chunks; each module
    # (stage 3: each unit's gather) waits for its own, the next backward for all.
    run_on_ranks(_compare, world, stage, 1.0, False, True, True, True, timeout=240)


def test_step_in_backward_partial_and_fused_at_stage_2(compared):
    _ran(compared, 2, "step_in_backward_partial_fused_stage2")


def _step_in_backward_refusals(rank, world):
    model = tiny_llama(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=3000, offload=OptimizerOffload("cpu", chunk_numel=5000))
    engine.set_step_in_backward(True)
    wrapped = ZeroModule(model, engine)
    wrapped(**batch(rank, 0, 0, model.config.vocab_size)).loss.backward()
    with pytest.raises(RuntimeError, match=r"clip_grad_norm_\(1.0\): the optimizer step of offloaded buckets ran during backward"):
        engine.clip_grad_norm_(1.0)
    opt.step()
    wrapped.zero_grad()
    # A loop that accumulates without no_sync or a boundary source: the second backward would
    # add to grads whose step already ran.
    wrapped(**batch(rank, 1, 0, model.config.vocab_size)).loss.backward()
    with pytest.raises(RuntimeError, match="got gradients again after its optimizer step ran in backward"):
        wrapped(**batch(rank, 1, 1, model.config.vocab_size)).loss.backward()
    engine.close()


def test_step_in_backward_refuses_clipping_and_unsignalled_accumulation():
    run_on_ranks(_step_in_backward_refusals, 1, timeout=120)


def test_offload_ratio_picks_buckets_by_elements():
    spec = OptimizerOffload("cpu", ratio=0.5)
    assert spec.offloaded([10, 10, 10, 10]) == [True, True, False, False]
    assert OptimizerOffload("cpu").offloaded([5, 1, 7]) == [True, True, True]
    with pytest.raises(ValueError, match="'nvme' needs nvme_path"):
        OptimizerOffload("nvme")
    with pytest.raises(ValueError, match=r"one of \('cpu', 'nvme'\), got 'disk'"):
        OptimizerOffload("disk")


def test_host_step_chunks_follow_bucket_order_and_skip_device_buckets():
    from hf_zero.engine.offload.host_step import HostStep
    from hf_zero.engine.streams import Streams

    step = HostStep([True, True, False, True, True], [3000, 3000, 10, 4000, 500], torch.device("cpu"),
                    HostMemory(False), Streams.for_device("cpu"), chunk_numel=5000)
    assert step.chunks == [[0, 1], [3, 4]]
    assert HostStep([False, True], [10, 10], torch.device("cpu"), HostMemory(False), Streams.for_device("cpu"), 5000).chunks == [[1]]


@pytest.fixture
def pinned_slabs(monkeypatch):
    """A HostMemory that carves "pinned" slabs as on a CUDA machine, and the slabs it made
    (numel, pinned): torch.empty is a CPU stand-in."""
    made = []

    def fake_empty(*shape, dtype=None, pin_memory=False, **kw):
        t = torch.zeros(*shape, dtype=dtype)
        made.append((t.numel(), pin_memory))
        return t

    memory = HostMemory(True)
    memory.pin = True
    monkeypatch.setattr(torch, "empty", fake_empty)
    return memory, made


def test_host_memory_carves_pinned_slabs_without_power_of_two_waste(pinned_slabs):
    memory, made = pinned_slabs
    a = memory.empty(3 * (1 << 24))  # 192 MiB: fits the first 256 MiB slab
    b = memory.empty(1 << 23)  # 32 MiB: the same slab's tail
    c = memory.empty(50 * (1 << 20))  # 200 MiB: past the first slab's 32 MiB left, a second slab
    d = memory.empty(1000)  # first fit: back in the first slab
    # (requests of a slab or more are page-locked at their exact size instead: tests/engine/test_host_memory.py)
    assert made == [(1 << 28, True), (1 << 28, True)]
    assert memory.reserved_bytes() == 2 * (1 << 28)
    assert a.dtype == torch.float32 and a.numel() == 3 * (1 << 24) and c.numel() == 50 * (1 << 20)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() == d.untyped_storage().data_ptr()
    a.fill_(1.0)
    assert b.sum() == 0 and d.sum() == 0  # views do not overlap


def test_host_memory_carves_param_dtypes_from_pinned_slabs(pinned_slabs):
    memory, made = pinned_slabs
    a = memory.empty(1000, torch.bfloat16)  # 2000 bytes, 2048 with alignment
    b = memory.empty(10)  # fp32 right after
    assert made == [(1 << 28, True)]
    assert (a.dtype, a.numel(), b.dtype, b.numel()) == (torch.bfloat16, 1000, torch.float32, 10)
    assert b.data_ptr() - a.data_ptr() == 2048
    a.fill_(1.0)
    assert b.sum() == 0
