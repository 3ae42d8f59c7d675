"""``offload_optimizer.ratio: "auto"`` ([Note: auto ratio] in hf_zero/engine/offload/auto_ratio.py):
the choice from a device's headroom, and the engine's re-placement after the first step, held bit
for bit against the same ratio given by hand (CPU gloo ranks; the device memory is a stand-in)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload import device_room
from hf_zero.engine.offload.auto_ratio import MARGIN, choose
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.engine.offload.speculation import SpeculationPolicy
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import batch, tiny_llama

STEPS = 5
DEVICE = 1 << 20  # the stand-in device's memory: the margin is 10% of it


def _split(sizes, ratio):
    return OptimizerOffload("cpu", ratio=ratio).offloaded(sizes)


def test_choose_keeps_the_last_buckets_that_fit_beside_the_margin():
    sizes, per = [10, 20, 30, 40], 16
    split = lambda r: _split(sizes, r)  # noqa: E731
    margin = int(MARGIN * 1000)
    # room for the last two buckets (70 elements x 16 bytes) and 5 bytes more: they come back
    got = choose(sizes, margin + 16 * 70 + 5, 1000, per, split)
    assert (got.ratio, got.moved_bytes, got.margin_bytes) == (0.3, 16 * 70, margin)
    assert split(got.ratio) == [True, True, False, False]
    assert got.left_bytes == margin + 5
    # one byte short of the third bucket: still two
    assert split(choose(sizes, margin + 16 * 90 - 1, 1000, per, split).ratio) == [True, True, False, False]
    # no room beyond the margin: nothing moves
    assert choose(sizes, margin, 1000, per, split).ratio == 1.0
    assert choose(sizes, 0, 0, per, split).ratio == 1.0  # no device memory to ask about (CPU)
    # room for everything: the first bucket stays offloaded (a ratio is > 0)
    everything = choose(sizes, 10**9, 1000, per, split)
    assert everything.ratio == 0.1 and split(everything.ratio) == [True, False, False, False]


def test_chosen_ratio_given_by_hand_offloads_the_same_buckets():
    rng = random.Random(0)
    for _ in range(2000):
        sizes = [rng.randint(1, 10**7) for _ in range(rng.randint(1, 12))]
        headroom = rng.randint(0, 16 * sum(sizes))
        got = choose(sizes, headroom, 0, 16, lambda r: _split(sizes, r))
        kept = _split(sizes, got.ratio)
        assert kept[0] and sum(kept) >= 1
        moved = sum(s for s, k in zip(sizes, kept) if not k)
        assert moved * 16 == got.moved_bytes <= headroom
        first_left = max((i for i, k in enumerate(kept) if k), default=0)
        if first_left > 0:  # the next bucket would not have fitted
            assert (moved + sizes[first_left]) * 16 > headroom


def _groups(model):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def _train(model, engine, rank, clip):
    wrapped = ZeroModule(model, engine)
    losses, placed = [], [[b.offloaded for b in engine.buckets]]  # before the first step, then after each
    for step in range(STEPS):
        for micro in range(2):
            with (wrapped.no_sync() if micro == 0 else torch.enable_grad()):
                loss = wrapped(**batch(rank, step, micro, model.config.vocab_size)).loss / 2
                loss.backward()
        engine.clip_grad_norm_(clip) if clip else engine.grad_norm()
        engine.optimizer.step()
        wrapped.zero_grad()
        losses.append(loss.item())
        placed.append([b.offloaded for b in engine.buckets])
    with engine.gathered():
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    pieces = [p for g in engine.optimizer.param_groups for p in g["params"]]
    state = {(k, key): v.clone() for k, p in enumerate(pieces) for key, v in engine.optimizer.state[p].items()}
    return losses, placed, params, state, engine.held_bytes()


def _auto_vs_hand(rank, world, stage, overlap, share_of_rank, nvme_path=None, host_share=0.0):
    # The stand-in device: left at the first step's peak, the margin and room for
    # ``share_of_rank[rank]`` of the optimizer's elements at 12 bytes each (fp32 params: the
    # master is the shard itself; AdamW's 2 moments; the main grad).
    elements = {}
    device_room.headroom = lambda device: (int(MARGIN * DEVICE + 12 * share_of_rank[rank] * elements["n"]), DEVICE)
    base = tiny_llama(0, tied=True)
    runs = []
    for ratio in ("auto", None):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
        if ratio is None:  # by hand: the ratio the auto run chose
            ratio = runs[0][-1].ratio
        engine = ZeroEngine(model, opt, stage=stage, bucket_numel=1000,
                            offload=OptimizerOffload("nvme" if nvme_path else "cpu", ratio=ratio, chunk_numel=2000,
                                                     nvme_path=nvme_path, host_share=host_share))
        elements["n"] = sum(b.shard_numel for b in engine.buckets)
        if overlap:
            engine.set_step_in_backward(True, overlap_forward=True, speculation=SpeculationPolicy(budget=0.5))
        runs.append((*_train(model, engine, rank, 0.5 if overlap else None), engine.auto_ratio))
        tier = type(engine._host_step.tier).__name__
        engine.close()
    (a_loss, a_placed, a_params, a_state, a_held, choice), (h_loss, h_placed, h_params, h_state, h_held, none) = runs
    return {
        "choice": choice, "hand_choice": none, "tier": tier,
        "first_step_all_offloaded": all(a_placed[0]),
        "placed_as_by_hand": a_placed[1:] == h_placed[1:] and a_placed[-1] == h_placed[-1],
        "some_on_device": not all(h_placed[-1]), "some_offloaded": any(h_placed[-1]),
        "losses": a_loss == h_loss,
        "params": [n for n in a_params if not torch.equal(a_params[n], h_params[n])],
        "state": [k for k in a_state if k not in h_state or not torch.equal(a_state[k], h_state[k])]
                 + [k for k in h_state if k not in a_state],
        # (speculation's copies, counted in host_offload, depend on which chunks the worker reached)
        "held": {k: v for k, v in a_held.items() if not overlap or k != "host_offload"}
                == {k: v for k, v in h_held.items() if not overlap or k != "host_offload"},
    }


def _check(results, world):
    choices = {r["choice"] for r in results}
    assert len(choices) == 1  # every rank chose the same
    for r in results:
        assert r["choice"] is not None and 0 < r["choice"].ratio < 1 and r["hand_choice"] is None, r
        assert r["first_step_all_offloaded"] and r["placed_as_by_hand"], r
        assert r["some_on_device"] and r["some_offloaded"], r
        assert r["losses"] and r["params"] == [] and r["state"] == [] and r["held"], r


@pytest.mark.parametrize("world,stage", [(1, 2), (2, 2), (2, 3)])
def test_auto_ratio_equals_the_chosen_ratio_given_by_hand(world, stage):
    _check(run_on_ranks(_auto_vs_hand, world, stage, False, [0.5, 0.5], timeout=240), world)


def test_auto_ratio_with_the_speculating_overlapped_host_step_smallest_headroom_wins():
    # rank 1 has less room: both ranks take its figure
    results = run_on_ranks(_auto_vs_hand, 2, 2, True, [0.9, 0.4], timeout=240)
    _check(results, 2)
    # 40% of the elements' room: less than 40% moved (whole buckets), but some
    assert all(0.6 <= r["choice"].ratio < 1 for r in results)


def test_auto_ratio_with_the_nvme_tier(tmp_path):
    # the buckets that come back take their masters and state out of the old swap files (deleted,
    # still mapped); those that stay are written into the new files at their next step
    _check(run_on_ranks(_auto_vs_hand, 2, 2, False, [0.5, 0.5], str(tmp_path), timeout=240), 2)
    assert list(tmp_path.iterdir()) == []  # every swap directory removed at close


def test_auto_ratio_with_part_of_the_state_in_host_memory(tmp_path):
    # offload_optimizer.host_share ([Note: host share]): the re-placed buckets split anew, bit for bit
    results = run_on_ranks(_auto_vs_hand, 1, 2, False, [0.5], str(tmp_path), 0.5, timeout=240)
    _check(results, 1)
    assert results[0]["tier"] == "SplitTier"
    assert list(tmp_path.iterdir()) == []


def _no_device(rank, world):
    device_room.headroom = lambda device: None  # CPU: no device memory to ask about
    model = tiny_llama(0, tied=True)
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), stage=2, bucket_numel=3000,
                        offload=OptimizerOffload("cpu", ratio="auto", chunk_numel=2000))
    _train(model, engine, rank, None)
    out = (engine.auto_ratio.ratio, engine.offload.ratio, all(b.offloaded for b in engine.buckets),
           engine.auto_ratio.line())
    engine.close()
    return out


def test_without_device_memory_everything_stays_offloaded():
    ratio, setting, offloaded, line = run_on_ranks(_no_device, 1, timeout=120)[0]
    assert (ratio, setting, offloaded) == (1.0, 1.0, True)
    assert 'offload_optimizer.ratio "auto" kept 1.0' in line and "CPU" in line


def _pin_as_on_cuda() -> None:
    """HostMemory as on a CUDA machine (this process only): pinned requests carved from slabs of
    16 KiB (ordinary tensors) or registered in place (a stand-in that succeeds), so that freeing
    exercises the slab and exact bookkeeping that CPU runs skip (session 20: ``free`` crashed when
    the emptied slab was not the first; only a 7B GPU run found it)."""
    from hf_zero.engine.offload import host_memory

    init = host_memory.HostMemory.__init__

    def pinned_init(self, pin):
        init(self, pin)
        self.pin = pin

    host_memory.HostMemory.__init__ = pinned_init
    host_memory.HostMemory.SLAB_BYTES = 1 << 14
    host_memory.HostMemory._pinned_slab = lambda self, nbytes: torch.empty(nbytes, dtype=torch.uint8)
    host_memory._register = lambda ptr, nbytes: 0
    host_memory._unregister = lambda pointers: pointers.clear()


def _old_grads_at_rebuild(rank, world, pinned=False):
    """The host step that "auto" replaces after the first step has handed its host grads back
    ([Note: freeing host memory] in host_memory.py) before the new masters are allocated: a 7B run
    was killed holding both (bench/results/h100_session19_summary.md). ``pinned``: with
    ``_pin_as_on_cuda``."""
    import weakref

    from hf_zero.engine import pieces

    if pinned:
        _pin_as_on_cuda()

    elements = {}
    device_room.headroom = lambda device: (int(MARGIN * DEVICE + 12 * 0.5 * elements["n"]), DEVICE)
    model = tiny_llama(0, tied=True)
    engine = ZeroEngine(model, torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True), stage=2, bucket_numel=1000,
                        offload=OptimizerOffload("cpu", ratio="auto", chunk_numel=2000))
    elements["n"] = sum(b.shard_numel for b in engine.buckets)
    seen, build = {}, pieces.build_masters
    first = engine._host_step

    def watched(engine_, replacing=False):
        seen["alive"] = sum(r() is not None for r in seen["grads"])
        return build(engine_, replacing=replacing)

    pieces.build_masters = watched
    try:
        wrapped = ZeroModule(model, engine)
        wrapped(**batch(rank, 0, 0, model.config.vocab_size)).loss.backward()
        engine.grad_norm()
        seen["grads"] = [weakref.ref(g) for g in first.host_grads.values()]
        engine.optimizer.step()  # the first step: "auto" chooses and re-places
        wrapped.zero_grad()
    finally:
        pieces.build_masters = build
    out = {"grads": len(seen["grads"]), "alive": seen.get("alive"), "left": len(first.host_grads),
           "moved": not all(b.offloaded for b in engine.buckets)}
    engine.close()
    return out


@pytest.mark.parametrize("pinned", [False, True])
def test_the_replaced_host_step_frees_its_grads_before_the_new_masters(pinned):
    out = run_on_ranks(_old_grads_at_rebuild, 1, pinned, timeout=120)[0]
    assert out["moved"] and out["grads"] > 0, out  # a re-placement happened, with host grads to free
    assert out["alive"] == 0 and out["left"] == 0, out


def _host_limited(rank, world):
    """[Note: auto ratio] A host that holds only part of ratio 1 (its memory a stand-in): "auto"
    starts from the first buckets the host holds with ``host_room.MARGIN`` free, the rest on the
    device; after the first step it moves more as the device's headroom allows, counting from
    there; and trains bit for bit as the chosen ratio given by hand."""
    from hf_zero.engine.offload import host_room

    elements = {}
    device_room.headroom = lambda device: (int(MARGIN * DEVICE + 12 * 0.2 * elements["n"]), DEVICE)
    base = tiny_llama(0, tied=True)
    n = sum(p.numel() for p in base.parameters() if p.requires_grad)
    # 16 bytes an offloaded element on the host (fp32 grad 4, AdamW master and moments 12): room for
    # 60% of them beside the 10% margin of a host of 160 bytes an element
    host_room.meminfo = lambda: (int(16 * n + 16 * 0.6 * n), 160 * n)
    runs = []
    for ratio in ("auto", None):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
        if ratio is None:
            ratio = runs[0][-1].ratio
        engine = ZeroEngine(model, opt, stage=2, bucket_numel=1000,
                            offload=OptimizerOffload("cpu", ratio=ratio, chunk_numel=2000))
        elements["n"] = sum(b.shard_numel for b in engine.buckets)
        runs.append((*_train(model, engine, rank, None), engine.auto_ratio))
        engine.close()
    (a_loss, a_placed, a_params, a_state, _, choice), (h_loss, h_placed, h_params, h_state, _, _) = runs
    sizes = [1] * len(a_placed[0])  # (counts only)
    return {
        "first": sum(a_placed[0]) / len(sizes), "after": sum(a_placed[1]) / len(sizes),
        "first_is_prefix": a_placed[0] == sorted(a_placed[0], reverse=True),
        "ratio": choice.ratio, "moved": choice.moved_bytes,
        "placed_as_by_hand": a_placed[1:] == h_placed[1:],
        "same": a_loss == h_loss and all(torch.equal(a_params[k], h_params[k]) for k in a_params)
                and a_state.keys() == h_state.keys() and all(torch.equal(a_state[k], h_state[k]) for k in a_state),
    }


def test_auto_ratio_starts_from_what_the_host_holds():
    for r in run_on_ranks(_host_limited, 2, timeout=240):
        assert 0 < r["first"] < 1 and r["first_is_prefix"], r  # part on the device from the first step
        assert r["after"] < r["first"] and r["moved"] > 0, r  # then more moved, counted from there
        assert r["ratio"] < 0.61 and r["placed_as_by_hand"] and r["same"], r
