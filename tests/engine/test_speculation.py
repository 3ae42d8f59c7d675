"""Speculation then validation ([Note: speculation] in hf_zero/engine/offload/speculation.py): with
clipping on, the host step of CPU optimizer offload runs during backward as if no clipping were
needed and is redone when it was; params and optimizer state must be those of the waiting path
(no step in backward) bit for bit, whichever way each step goes.

One run per (world, stage) forces every case in turn, through a clip threshold per step:

    step  threshold          speculated?        verdict
    0     huge               yes (no state yet)  stands
    1     tiny               yes                 clipped: redone from the copies
    2     huge               no (backoff)        stands: held chunks stepped after the norm
    3     tiny               yes                 clipped: redone (state present)
    4     tiny               no (backoff)        clipped
    5     no clip call       no                  stands
    6     inf grads, skipped yes                 skipped (as GradScaler skips): undone
    7     huge               no                  stands
    8     NaN grads          yes                 clipped with a NaN coefficient: redone, NaN params as the waiting path

Params and optimizer state are compared bit for bit after step 7 and after step 8 (as bit
patterns: NaN included).

Rank starts: the runs of one world size share one start, made once for the module (``compared``),
except the slow-worker case, whose slowed host step stays in its process: it starts alone.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.settings import OptimizerOffload, ParamOffload
from hf_zero.engine.offload.speculation import (Action, ChunkStep, Speculation, SpeculationPolicy, Verdict)
from hf_zero.testing.multiprocess import run_each, run_on_ranks
from tests.engine.models import add_frozen_and_unused, batch, slow_host_step, tiny_llama

HUGE, TINY = 1e9, 1e-3
# (threshold or None for no clip call, the loss factor: 1, inf or nan)
SCHEDULE = [(HUGE, 1.0), (TINY, 1.0), (HUGE, 1.0), (TINY, 1.0), (TINY, 1.0), (None, 1.0), (HUGE, float("inf")),
            (HUGE, 1.0), (HUGE, float("nan"))]
SPECULATED, REDONE = 5, 4  # steps 0, 1, 3, 6, 8; of which 1, 3, 6, 8


def _groups(model):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def _bits(t: torch.Tensor) -> list:
    return t.detach().float().reshape(-1).view(torch.int32).tolist()


def _snapshot(model, engine) -> dict:
    """Full params and every piece's optimizer state, in piece order, as bit patterns."""
    with engine.gathered():
        out = {n: _bits(p) for n, p in model.named_parameters()}
    pieces = [p for g in engine.optimizer.param_groups for p in g["params"]]
    for k, piece in enumerate(pieces):
        for key, v in sorted(engine.optimizer.state.get(piece, {}).items()):
            out[f"state {k} {key}"] = _bits(v) if torch.is_tensor(v) else v
    return out


def let_the_worker_start(engine, every_chunk: bool) -> None:
    """Wait until the worker has started every chunk queued before the verdict (or, with
    ``every_chunk`` False, one of them): which steps speculate is then the policy's alone, not
    the timing's."""
    spec = engine._host_step.speculation if engine._host_step is not None else None
    if spec is None:
        return
    deadline = time.monotonic() + 60
    while spec.open and time.monotonic() < deadline:
        states = list(spec.chunks.values())
        if ChunkStep.QUEUED not in states or (not every_chunk and ChunkStep.SPECULATED in states):
            return
        time.sleep(0.001)


def scheduled_backward(wrapped, model, rank: int, step: int, factor: float) -> None:
    """Step ``step``'s two micro-steps (the first under ``no_sync``), the last loss times ``factor``
    (1, inf or nan: ``SCHEDULE``'s second column)."""
    for micro in range(2):
        last = micro == 1
        with (wrapped.no_sync() if not last else torch.enable_grad()):
            loss = wrapped(**batch(rank, step, micro, model.config.vocab_size)).loss / 2
            (loss * factor if last else loss).backward()


def _train(model, engine, rank, slow):
    wrapped = ZeroModule(model, engine)
    snaps, norms = [], []
    for step, (threshold, factor) in enumerate(SCHEDULE):
        scheduled_backward(wrapped, model, rank, step, factor)
        let_the_worker_start(engine, every_chunk=not slow)
        norm = engine.clip_grad_norm_(threshold) if threshold is not None else engine.grad_norm()
        norms.append(_bits(norm))
        if torch.isfinite(norm) or factor != float("inf"):
            engine.optimizer.step()  # (inf: skipped, as GradScaler skips an overflowing step)
        wrapped.zero_grad()
        if step == len(SCHEDULE) - 2:
            snaps.append(_snapshot(model, engine))
    snaps.append(_snapshot(model, engine))
    return norms, snaps


def _compare(rank, world, stage, fused=False, ratio=1.0, param_offload=False, slow=False, state_dtype="fp32"):
    base = add_frozen_and_unused(tiny_llama(0, tied=True))
    if slow:
        # A slow host step: backward ends before the worker has started every queued chunk (those
        # are stepped once, after the verdict), and the next forward waits for the redone chunks.
        slow_host_step()
    runs, policy = [], None
    for speculate in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2, fused=fused, foreach=None if fused else True)
        engine = ZeroEngine(model, opt, stage=stage, bucket_numel=3000,
                            offload=OptimizerOffload("cpu", ratio=ratio, chunk_numel=2000, state_dtype=state_dtype),
                            offload_param=ParamOffload("cpu") if param_offload else None)
        if speculate:
            # max_backoff 1: after a redone step exactly one step waits for the norm
            policy = SpeculationPolicy(budget=0.5, max_backoff=1)
            engine.set_step_in_backward(True, overlap_forward=True, speculation=policy)
            assert len(engine._host_step.chunks) >= 2  # a budget of half the elements holds some of them back
        runs.append(_train(model, engine, rank, slow))
        engine.close()
    (norms_wait, snaps_wait), (norms_spec, snaps_spec) = runs
    differ = [(i, name) for i, (a, b) in enumerate(zip(snaps_wait, snaps_spec)) for name in a if a[name] != b[name]]
    last = torch.tensor(snaps_spec[-1]["model.norm.weight"], dtype=torch.int32).view(torch.float32)
    nan_at_end = bool(last.isnan().all())
    return {"norms_equal": norms_wait == norms_spec, "differ": differ[:5], "same_keys": set(snaps_wait[0]) == set(snaps_spec[0]),
            "counts": (policy.speculated_steps, policy.redone_steps), "nan_at_end": nan_at_end}


def _check(results):
    for r in results:
        assert r["same_keys"] and r["differ"] == [] and r["norms_equal"], r
        assert r["counts"] == (SPECULATED, REDONE), r
        assert r["nan_at_end"]  # the NaN step really made NaN params, in both paths


# The _compare runs without a slowed host step (slow_host_step stays in its process: that case starts
# alone), by world size: {key: (stage, fused, ratio, param_offload, slow, state_dtype)}.
RUNS = {
    1: {("stage", stage): (stage, False, 1.0, False, False, "fp32") for stage in (1, 2)},
    2: {**{("stage", stage): (stage, False, 1.0, False, False, "fp32") for stage in (1, 2, 3)},
        "param_offload": (3, False, 1.0, True, False, "fp32"),
        "bf16_host_state": (2, False, 1.0, False, False, "bf16")},
}


@pytest.fixture(scope="module")
def compared() -> dict[int, dict]:
    """Per world size of ``RUNS``, per run: every rank's ``_compare``; one rank start per world size."""
    out = {}
    for world, runs in RUNS.items():
        ranks = run_on_ranks(run_each, world, _compare, runs, timeout=600)
        out[world] = {key: [r[key] for r in ranks] for key in runs}
    return out


@pytest.mark.parametrize("world,stage", [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3)])
def test_speculation_matches_the_waiting_path(world, stage, compared):
    _check(compared[world][("stage", stage)])


def test_speculation_at_stage_3_fused_partial_offload_slow_worker():
    # fused AdamW folds the clip into grad_scale (both paths); ratio 0.5 keeps some buckets on the device
    _check(run_on_ranks(_compare, 1, 3, True, 0.5, False, True, timeout=300))


def test_speculation_with_parameter_offload(compared):
    # the host shards are written by the speculative step, and again by the redo or the undo
    _check(compared[2]["param_offload"])


def test_speculation_with_bf16_host_state(compared):
    # [Note: bf16 host state]: the copies are of the bf16 moments, a redo rounds again from them
    _check(compared[2]["bf16_host_state"])


# ---- the state machine alone (no threads) ---------------------------------------------------------


def test_policy_backs_off_while_clipping_and_resumes_after_clean_steps():
    policy = SpeculationPolicy(max_backoff=4)
    seen = []
    for clipped in [False, True, True, False, True, False, False, False, False, False]:
        speculate = policy.speculate_now()
        seen.append(speculate)
        policy.record(Verdict.CLIPPED if clipped else Verdict.STOOD, speculate)
    # step 1 redone: the backoff doubles to 2, so 2 clean steps in a row are needed; the clips at
    # 2 and 4 (not speculated) start the count again; 5 and 6 are clean; 7 speculates again
    assert seen == [True, True, False, False, False, False, False, True, True, True]
    assert (policy.speculated_steps, policy.redone_steps, policy.clipped_steps) == (5, 1, 3)
    with pytest.raises(ValueError, match=r"speculation budget must be in \[0, 1\].*got 1.5"):
        SpeculationPolicy(budget=1.5)


def test_chunk_lifecycle_and_budget():
    spec = Speculation(SpeculationPolicy(budget=0.5, max_backoff=1), [10, 10, 10, 10], bytes_per_element=12)
    assert [spec.hand_over(c) for c in range(4)] == [True, True, False, False]  # half the elements
    assert spec.start(0) == (Action.SPECULATE, None)
    redo, held = spec.validate(0.5)  # clipping needed
    assert (redo, held) == ([0], [2, 3])
    assert spec.start(1) == (Action.STEP, 0.5)  # started after the verdict: stepped once, no copy
    assert spec.start(0) == (Action.REDO, 0.5)
    assert spec.start(2) == (Action.STEP, 0.5)
    assert set(spec.chunks.values()) == {ChunkStep.FINAL, ChunkStep.HELD}  # chunk 3 not started yet
    spec.end_step()
    assert spec.verdict is Verdict.IDLE and spec.chunks == {}
    # the policy waits one step after a redo
    assert [spec.hand_over(c) for c in range(4)] == [False] * 4
    assert spec.validate(1.0) == ([], [0, 1, 2, 3])
    spec.end_step()
    # a skipped step: speculated chunks to restore, the others left alone
    assert spec.hand_over(0) and spec.start(0) == (Action.SPECULATE, None)
    assert spec.hand_over(1)
    assert spec.skip() == [0]
    assert spec.start(1) == (Action.NOTHING, None)
    with pytest.raises(AssertionError, match="verdict SKIPPED, expected"):
        spec.validate(1.0)


def test_room_counts_the_state_a_first_step_creates(monkeypatch):
    """A chunk whose pieces have no optimizer state yet (a run's first step) needs room for its
    copies and for the state that step creates (AdamW: 8 of its 12 bytes per element), since
    ``MemAvailable`` does not count that state yet; checked once per chunk."""
    from hf_zero.engine.offload import speculation

    total = 1000 * 12  # MemTotal; the reserve is 10% of it
    # 1200 bytes of reserve + 100 elements x 12 bytes of copies fit in 2500 available, + 800 of state does not
    monkeypatch.setattr(speculation, "meminfo", lambda: (2500, total))
    spec = Speculation(SpeculationPolicy(budget=1.0), [100, 100], bytes_per_element=12)
    assert spec.hand_over(0, stateless=True) is False and spec.chunks[0] is ChunkStep.HELD
    assert spec.hand_over(1, stateless=False) is True  # its state exists: the copies alone fit
    # just enough: chunk 0's copies and state, and the state chunk 1 makes in this step ([Note: state to come])
    monkeypatch.setattr(speculation, "meminfo", lambda: (1200 + 1200 + 800 + 800, total))
    spec = Speculation(SpeculationPolicy(budget=1.0), [100, 100], bytes_per_element=12)
    assert spec.hand_over(0, stateless=True) is True
    monkeypatch.setattr(speculation, "meminfo", lambda: (0, total))  # checked once: chunk 0 keeps its room
    spec.validate(1.0)
    spec.end_step()
    assert spec.hand_over(0, stateless=False) is True


def test_a_first_step_leaves_room_for_the_state_of_the_chunks_after(monkeypatch):
    """[Note: state to come]: at a run's first step the chunks handed over first must leave room for
    the state the later ones (and the held ones) create in the same step: with room for all the
    state and one chunk's copies, one chunk speculates, not every chunk whose own need fits."""
    from hf_zero.engine.offload import speculation

    total = 1000 * 12  # the reserve: 1200 bytes
    # 4 chunks x 100 elements: state 4 x 800; one chunk's copies 1200; the reserve 1200; a little spare
    monkeypatch.setattr(speculation, "meminfo", lambda: (4 * 800 + 1200 + 1200 + 100, total))
    spec = Speculation(SpeculationPolicy(budget=1.0), [100, 100, 100, 100], bytes_per_element=12)
    assert [spec.hand_over(c, stateless=True) for c in range(4)] == [True, False, False, False]


def test_room_promised_earlier_in_the_step_is_not_offered_again(monkeypatch):
    """[Note: promised room]: chunks handed over in one step before the worker allocated anything
    see the same ``MemAvailable``; each one's room comes out of it for the next, so together they
    never eat the reserve. After ``end_step`` the reading stands alone again."""
    from hf_zero.engine.offload import speculation

    total = 1000 * 12  # the reserve: 1200 bytes
    monkeypatch.setattr(speculation, "meminfo", lambda: (1200 + 2 * 1200 + 600, total))  # room for two chunks' copies
    spec = Speculation(SpeculationPolicy(budget=1.0), [100, 100, 100, 100], bytes_per_element=12)
    assert [spec.hand_over(c) for c in range(3)] == [True, True, False]
    assert spec.chunks[2] is ChunkStep.HELD
    spec.validate(1.0)
    spec.end_step()
    # the next step: chunks 0 and 1 keep their buffers; a fresh reading (their copies now counted in
    # it) with room for one more chunk admits chunk 2, and chunk 3 is held again
    monkeypatch.setattr(speculation, "meminfo", lambda: (1200 + 1200 + 600, total))
    assert [spec.hand_over(c) for c in range(4)] == [True, True, True, False]


def test_a_first_steps_state_copies_stay_promised_until_made(monkeypatch):
    """[Note: promised room]: a chunk admitted at the run's first step (no state yet) copies only
    its masters then; its state's copies (8 of AdamW's 12 bytes an element) come at its next
    speculative step. Until that step ends they stay promised, so a chunk asking in between
    does not take that room too."""
    from hf_zero.engine.offload import speculation

    total = 1000 * 12  # the reserve: 1200 bytes
    spec = Speculation(SpeculationPolicy(budget=1.0), [100, 100], bytes_per_element=12)
    monkeypatch.setattr(speculation, "meminfo", lambda: (4600, total))
    assert spec.hand_over(0, stateless=True) is True  # 100 x (12 + 8) = 2000 promised, 800 of chunk 1's state to come
    spec.validate(1.0)
    spec.end_step()
    # allocated since: both chunks' state (1600) and chunk 0's masters' copy (400); 800 of its state copies to come
    monkeypatch.setattr(speculation, "meminfo", lambda: (4600 - 2000, total))
    assert spec.hand_over(0) is True  # its state's copies are made in this step
    assert spec.hand_over(1) is False  # 2600 - 800 promised - 1200 leaves less than the reserve
    spec.validate(1.0)
    spec.end_step()
    # chunk 0's state copies are made now (a fresh reading counts them): nothing is promised any more
    monkeypatch.setattr(speculation, "meminfo", lambda: (2400, total))
    assert [spec.hand_over(c) for c in range(2)] == [True, True]


def test_copies_go_after_a_streak_without_speculation(monkeypatch):
    """[Note: idle copies]: a run that clips at every step stops speculating after its first redo;
    the copies' buffers go after ``RELEASE_AFTER`` such steps, and come back (room checked again)
    when speculation resumes."""
    from hf_zero.engine.offload import speculation

    monkeypatch.setattr(speculation, "meminfo", lambda: (1 << 40, 1 << 40))
    piece = torch.nn.Parameter(torch.randn(100))
    opt = torch.optim.AdamW([piece], lr=0.1)
    piece.grad = torch.randn(100)
    opt.step()
    spec = Speculation(SpeculationPolicy(budget=1.0, max_backoff=64), [100], bytes_per_element=12)
    assert spec.hand_over(0) and spec.start(0) == (Action.SPECULATE, None)
    spec.snapshots.keep(0, [piece], opt.state)
    held = spec.snapshots.nbytes()
    assert held >= 100 * 4 * 3 and 0 in spec._kept  # master and two moments (and the step count)
    assert spec.validate(0.5) == ([0], [])  # clipped: redone, and the policy waits
    spec.end_step()
    for step in range(speculation.RELEASE_AFTER):
        assert spec.snapshots.nbytes() == held  # still kept while the streak is short
        assert spec.hand_over(0) is False  # the policy waits: held
        spec.validate(0.5)
        spec.end_step()
    assert spec.snapshots.nbytes() == 0 and not spec._kept
    # steps that do not clip end the wait; the next speculation keeps copies again
    while not spec.hand_over(0):
        spec.validate(1.0)
        spec.end_step()
    assert spec.start(0) == (Action.SPECULATE, None) and 0 in spec._kept


def test_snapshots_restore_masters_and_state_bit_for_bit():
    from hf_zero.engine.offload.speculation import Snapshots

    pieces = [torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(pieces, lr=0.1)
    for p in pieces:
        p.grad = torch.randn_like(p)
    opt.step()  # state for both
    before = [p.detach().clone() for p in pieces], {k: v.clone() for k, v in opt.state[pieces[0]].items()}
    fresh = torch.nn.Parameter(torch.randn(3))  # no state yet
    fresh.grad = torch.randn(3)
    opt.add_param_group({"params": [fresh]})
    snaps = Snapshots()
    snaps.keep(0, pieces + [fresh], opt.state)
    opt.step()
    assert fresh in opt.state and int(opt.state[pieces[0]]["step"]) == 2
    snaps.restore(0, opt.state)
    assert all(torch.equal(p, q) for p, q in zip(pieces, before[0]))
    assert all(torch.equal(opt.state[pieces[0]][k], v) for k, v in before[1].items())
    assert fresh not in opt.state  # the first step's state is gone again
    assert snaps.nbytes() == 4 * (7 + 5 + 3) + 4 * 2 * (7 + 5) + 4 * 2  # masters, moments, two step counts
