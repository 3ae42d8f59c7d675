"""Stage 3 prefetch, the live-elements bound and persistent params, against DDP (CPU gloo ranks).

Units of the tiny Llama: one per decoder layer + the root (embeddings, final norm, LM head,
tied). Per step, prefetch or not: the forward gathers every unit once (root + layers), the
backward re-gathers the layers (the root stays gathered from its forward to its backward), so
(layers + 1) + layers all-gathers. Persistent params add one all-gather after the step (their
updated shards) and are never gathered by forward or backward. On CUDA the same tests exercise the
gather stream (streams.py); on CPU the gathers are gloo async handles.

Rank starts: the gloo runs of one world size share one start, made once for the module (``runs``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from hf_zero.config import ConfigError
from hf_zero.config.schema import ZeroConfig
from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.stage3.units import UnitState
from hf_zero.engine.diagnostics.flight_recorder import RECORDER
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import add_frozen_and_unused, batch, tiny_llama
from tests.engine.test_parity import _optimizer, _rel

STEPS = 3
RTOL = 1e-5
ALL = 10**9  # a prefetch window or bound larger than the model


def _device() -> torch.device:
    """NCCL ranks (``run_on_ranks(..., backend="nccl")``) run on their GPU, gloo ranks on the CPU."""
    nccl = torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def _engine(model, opt, **kw):
    return ZeroEngine(model, opt, stage=3, bucket_numel=1, **kw)


def _run(rank, world, prefetch, max_live, persist, layers, checkpointing=None):
    """DDP parity for STEPS steps; returns what the tests check on every rank."""
    device = _device()
    ref = add_frozen_and_unused(tiny_llama(0, layers=layers)).to(device)
    model = copy.deepcopy(ref)
    if checkpointing is not None:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing})
    ddp = DDP(ref, find_unused_parameters=True) if world > 1 else ref
    ref_opt, opt = _optimizer(ref, "adamw"), _optimizer(model, "adamw")
    engine = _engine(model, opt, prefetch_numel=prefetch, max_live_numel=max_live, persistence_threshold=persist)
    wrapped = ZeroModule(model, engine)
    engine.ctx.take_counts()
    counts, gathers = [], []
    for step in range(STEPS):
        first = RECORDER.seq
        inputs = {k: v.to(device) for k, v in batch(rank, step, 0, ref.config.vocab_size).items()}
        loss_ref = ddp(**inputs).loss
        loss_ref.backward()
        loss = wrapped(**inputs).loss
        loss.backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        norm = engine.clip_grad_norm_(1.0)
        ref_opt.step(); ref_opt.zero_grad()
        opt.step(); wrapped.zero_grad()
        counts.append(engine.ctx.take_counts().get("all_gather", 0))
        gathers.append([r.label for r in RECORDER.recent(64) if r.seq > first and r.kind == "all_gather"])
        assert abs(loss.item() - loss_ref.item()) <= RTOL * abs(loss_ref.item()), (step, loss, loss_ref)
        assert abs(norm.item() - norm_ref.item()) <= RTOL * norm_ref.item(), (step, norm, norm_ref)
        assert all(u.state is not UnitState.GATHERING for u in engine.units), "a prefetch outlived its pass"
        full_between_steps = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.numel() > 0)
        with engine.gathered():
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                assert _rel(p.detach(), q.detach()) <= RTOL, (step, name, _rel(p, q))
        engine.ctx.take_counts()  # the gathers of gathered() are not the step's
    layer_numel = sorted(u.numel for u in engine.units if not u.root and not u.persistent)
    root_numel = sum(u.numel for u in engine.units if u.root)
    small = sorted(n for n, p in ref.named_parameters() if p.requires_grad and p.numel() < persist)
    engine.close()
    return {"counts": counts, "gathers": gathers, "peak": engine.strategy.unit_hooks.peak_live_numel,
            "layer_numel": sorted(layer_numel), "root_numel": root_numel, "full": full_between_steps,
            "small": small, "persistent_units": sum(u.persistent for u in engine.units)}


def _check_gathers(results, per_step, after_step=0):
    """Same gathers in the same order on every rank, ``per_step`` of them in forward and backward
    (all of units, none of a persistent one), then ``after_step`` of updated shards."""
    for r in results:
        assert r["gathers"] == results[0]["gathers"], "ranks issued different all-gathers"
        assert r["counts"] == [per_step + after_step] * STEPS, r["counts"]
        for labels in r["gathers"]:
            units = [label for label in labels[:per_step] if label.startswith("unit ")]
            assert len(units) == per_step and not any("persistent" in label for label in units), labels
            assert all(label.startswith("params of bucket") for label in labels[per_step:]), labels


# Every gloo _run of the module, by world size: {key: (prefetch, max_live, persist, layers, checkpointing)}.
RUNS = {
    1: {("prefetch", ALL): (ALL, None, 0, 2, None)},
    2: {("prefetch", 1): (1, None, 0, 2, None), ("prefetch", ALL): (ALL, None, 0, 2, None),
        "prefetch_off": (0, None, 0, 3, None),
        # test_max_live_bound_is_respected: unbounded, then bounded to the root + the 2 largest layers
        # (known once the unbounded run has said the sizes, see _bound_of), then a bound of 0
        "max_live_free": (ALL, None, 0, 3, None), "max_live_bounded": (ALL, "bound", 0, 3, None),
        "max_live_tight": (ALL, 0, 0, 3, None),
        **{("persist", persist): (1, None, persist, 2, None) for persist in (100, ALL)},
        **{("checkpointing", reentrant): (1, None, 0, 2, reentrant) for reentrant in (False, True)}},
    4: {("prefetch", 1): (1, None, 0, 2, None)},
}


def _bound_of(free: dict) -> int:
    """The bound test_max_live_bound_is_respected sets: the root + the 2 largest layers of the unbounded run."""
    return free["root_numel"] + sum(free["layer_numel"][-2:])


def _runs(rank, world, runs):
    """``_run`` for every run of ``runs``, one after another in this one rank start (each with its own
    models and engine); a failing run names itself. ``max_live`` "bound": ``_bound_of`` the run
    "max_live_free" (run before it)."""
    out = {}
    for key, (prefetch, max_live, persist, layers, checkpointing) in runs.items():
        if max_live == "bound":
            max_live = _bound_of(out["max_live_free"])
        try:
            out[key] = _run(rank, world, prefetch, max_live, persist, layers, checkpointing)
        except BaseException as error:  # noqa: BLE001 - re-raised with the run named
            raise AssertionError(f"_run {key!r} at W {world}") from error
    return out


@pytest.fixture(scope="module")
def runs() -> dict[int, dict]:
    """Per world size of ``RUNS``, per run: every rank's results; one rank start per world size."""
    out = {}
    for world, those in RUNS.items():
        ranks = run_on_ranks(_runs, world, those, timeout=600)
        out[world] = {key: [r[key] for r in ranks] for key in those}
    return out


@pytest.mark.parametrize("world,prefetch", [(1, ALL), (2, 1), (2, ALL), (4, 1)])
def test_parity_and_gathers_with_prefetch(world, prefetch, runs):
    results = runs[world][("prefetch", prefetch)]
    if world > 1:
        _check_gathers(results, 5)
        # window of 1 element: one unit ahead (root + layer in use + next); ALL: both layers at
        # once from the root's forward on. With 2 layers both peak at the root + both layers.
        assert results[0]["peak"] == results[0]["root_numel"] + sum(results[0]["layer_numel"])


def test_prefetch_off_gathers_one_layer_at_a_time(runs):
    results = runs[2]["prefetch_off"]
    _check_gathers(results, 7)
    r = results[0]
    assert r["peak"] == r["root_numel"] + max(r["layer_numel"])  # as before prefetch existed


def test_max_live_bound_is_respected(runs):
    """3 layers, window ALL: unbounded, the root's forward prefetches all 3 layers; bounded to the
    root + the 2 largest layers, it never holds more (and reaches it when layers 1 and 2 are held
    together), and still gathers each unit exactly as often. Layer 0 is smaller (a frozen weight)."""
    free = runs[2]["max_live_free"]
    root, layers = free[0]["root_numel"], free[0]["layer_numel"]
    assert free[0]["peak"] == root + sum(layers)
    bound = root + sum(layers[-2:])
    assert bound == _bound_of(free[1])  # the bound the bounded run was given, on every rank
    bounded = runs[2]["max_live_bounded"]
    _check_gathers(bounded, 7)
    assert all(r["peak"] == bound for r in bounded)
    # a bound below what is needed now: no prefetch at all, the needed units are still gathered
    tight = runs[2]["max_live_tight"]
    _check_gathers(tight, 7)
    assert tight[0]["peak"] == root + max(layers)


@pytest.mark.parametrize("persist", [100, ALL])
def test_persistent_params_stay_full_and_train_like_ddp(persist, runs):
    """100 elements: the norms (36) and the unused 13-element bias are persistent; ALL: every
    param, so no unit is left to gather in forward or backward."""
    results = runs[2][("persist", persist)]
    r = results[0]
    assert r["persistent_units"] == 1 and r["small"]
    assert r["full"] == r["small"]  # between steps exactly the small params are whole
    if persist == ALL:
        assert not r["layer_numel"] and r["root_numel"] == 0
        _check_gathers(results, 0, after_step=1)
    else:
        assert any("norm" in n for n in r["small"])
        _check_gathers(results, 5, after_step=1)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_prefetch(reentrant, runs):
    """Recompute inside backward uses the prefetched unit and keeps it until its grads are in: still
    one gather per unit in forward and one per layer in backward."""
    results = runs[2][("checkpointing", reentrant)]
    _check_gathers(results, 5)


def test_negative_sizes_are_refused():
    for key in ("prefetch_bucket_size", "param_persistence_threshold", "max_live_parameters"):
        with pytest.raises(ConfigError, match=key):
            ZeroConfig(stage=3, **{key: -1})
    model = tiny_llama(0)
    for kw, name in (({"prefetch_numel": -1}, "prefetch_bucket_size"), ({"max_live_numel": -1}, "max_live_parameters"),
                     ({"persistence_threshold": -1}, "param_persistence_threshold")):
        with pytest.raises(ValueError, match=name):
            _engine(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL ranks)")
@pytest.mark.parametrize("prefetch,max_live,persist,reentrant", [(1, None, 0, None), (ALL, None, 100, None),
                                                                  (ALL, 0, 0, None), (1, None, 100, False)])
def test_cuda_gather_stream(prefetch, max_live, persist, reentrant):
    """The same checks on 2 GPUs: gathers launched on the gather stream, waited by the compute
    stream (streams.py); parity with DDP at fp32 within 1e-5."""
    results = run_on_ranks(_run, 2, prefetch, max_live, persist, 2, reentrant, timeout=300, backend="nccl")
    _check_gathers(results, 5, after_step=1 if persist else 0)
