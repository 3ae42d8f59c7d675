"""The device leg of the host step ([Note: device leg] in device_leg.py): with
``offload_optimizer.device_share`` the chunks that wait for the global norm are split, the highest
indices (up to the share) stepped on the device from copies of their masters, grads and state,
the rest on the CPU. Without CUDA the leg steps host copies, so its bookkeeping (which pieces,
their state, the clip scale as ``grad_scale`` or as a multiply, unused params, the copies back,
the params written) is checked bit for bit against the host step alone: params and optimizer
state after test_speculation's schedule (clipping that fires, that does not, no clip call, a
skipped overflowing step, a NaN norm) at stages 2 and 3 (and 1 at W = 2), W = 1 and 2 CPU gloo
ranks, speculating (the leg takes held chunks after the verdict) and waiting (no step in
backward: ``HostStep.run``), with foreach and fused AdamW, and at stage 3 with parameter offload
(the new params written into the host shards). Each world size is one rank start."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

from hf_zero.config import ConfigError, load_config
from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.device_leg import DeviceLeg
from hf_zero.engine.offload.settings import OptimizerOffload, ParamOffload
from hf_zero.engine.offload.speculation import SpeculationPolicy
from hf_zero.testing.multiprocess import run_on_ranks, run_report
from tests.engine.models import add_frozen_and_unused, tiny_llama
from tests.engine.test_speculation import (SCHEDULE, _bits, _groups, _snapshot, let_the_worker_start,
                                           scheduled_backward)

CHUNK = 1500  # elements: several chunks, so a share of 0.5 puts some on each side


def _engine(base, stage, share, fused, early, param_offload=False):
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(_groups(model), lr=1e-2, **({"fused": True} if fused else {"foreach": True}))
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=3000,
                        offload=OptimizerOffload("cpu", chunk_numel=CHUNK, device_share=share),
                        offload_param=ParamOffload("cpu") if param_offload else None)
    policy = None
    if early:  # as test_speculation: every chunk may speculate; after a redone step one step waits
        policy = SpeculationPolicy(budget=1.0, max_backoff=1)
        engine.set_step_in_backward(True, overlap_forward=True, speculation=policy)
    return model, engine, policy


def _run(rank, base, stage, share, fused, early, param_offload=False):
    model, engine, policy = _engine(base, stage, share, fused, early, param_offload)
    wrapped, norms, legs, kept = ZeroModule(model, engine), [], [], []

    for step, (threshold, factor) in enumerate(SCHEDULE):
        scheduled_backward(wrapped, model, rank, step, factor)
        let_the_worker_start(engine, every_chunk=True)
        norm = engine.clip_grad_norm_(threshold) if threshold is not None else engine.grad_norm()
        norms.append(_bits(norm))
        leg = engine._host_step.leg
        before = leg.stepped_chunks if leg is not None else 0
        kept_before = leg.kept_elements if leg is not None else 0
        if torch.isfinite(norm) or factor != float("inf"):
            engine.optimizer.step()
            engine.settle()  # (the leg's count is then this step's)
        legs.append((leg.stepped_chunks - before) if leg is not None else 0)
        kept.append((leg.kept_elements - kept_before) if leg is not None else 0)
        wrapped.zero_grad()
        assert not engine._host_step.grads.kept, step  # none left over: the leg took them, they came down, or step skipped
    chunks = len(engine._host_step.chunks)
    out = {"norms": norms, "snap": _snapshot(model, engine), "legs": legs, "kept": kept, "chunks": chunks,
           "counts": None if policy is None else (policy.speculated_steps, policy.redone_steps)}
    engine.close()
    return out


def _all(rank, world):
    out = {}
    for stage in ((2, 3) if world == 1 else (1, 2, 3)):
        base = add_frozen_and_unused(tiny_llama(0, tied=True, layers=4 if stage == 3 else 2))
        for fused, early in ((False, True), (True, True), (False, False)):
            if world == 2 and (fused or not early) and stage != 3:
                continue  # fused AdamW and the waiting path once at W 2
            out[(stage, fused, early, False)] = {share: _run(rank, base, stage, share, fused, early)
                                                 for share in (0.0, 0.5)}
            if not fused:  # [Note: kept leg grads]: planned at the first download, refused at the verdict
                with mock.patch.object(DeviceLeg, "choose", lambda self, waiting, ready, kept=frozenset(): []):
                    out[(stage, fused, early, False)]["refused"] = _run(rank, base, stage, 0.5, fused, early)
        if stage == 3:  # parameter offload: the leg's new params go into the host shards
            out[(stage, False, True, True)] = {share: _run(rank, base, stage, share, False, True, True)
                                               for share in (0.0, 0.5)}
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_device_leg_bit_for_bit_the_host_step(world):
    for rank, runs in enumerate(run_on_ranks(_all, world, timeout=300)):
        for (stage, fused, early, params_off), by_share in runs.items():
            where = (rank, stage, "fused" if fused else "foreach", "speculating" if early else "waiting",
                     "param offload" if params_off else "")
            host, leg = by_share[0.0], by_share[0.5]
            assert leg["norms"] == host["norms"], where
            differ = [k for k in host["snap"] if leg["snap"][k] != host["snap"][k]]
            assert set(leg["snap"]) == set(host["snap"]) and differ == [], (where, differ[:5])
            last = torch.tensor(host["snap"]["model.norm.weight"], dtype=torch.int32).view(torch.float32)
            assert last.isnan().all(), where  # the NaN step really made NaN params
            assert host["legs"] == [0] * len(SCHEDULE), where
            # The leg ran when the step waited for the norm, on at most half of the chunks, never at
            # the first step (no optimizer state yet) nor at a skipped one; speculating, only at the
            # steps that waited (2, 4, 5, 7: after a redone step, max_backoff 1), and the policy
            # counted as without it.
            chunks = leg["chunks"]
            assert all(0 <= n <= chunks // 2 + 1 for n in leg["legs"]), (where, leg["legs"], chunks)
            assert leg["legs"][0] == 0 and leg["legs"][6] == 0, (where, leg["legs"])
            if early:
                assert [s for s, n in enumerate(leg["legs"]) if n] == [2, 4, 5, 7], (where, leg["legs"])
                assert leg["counts"] == host["counts"], where
            else:
                assert all(leg["legs"][s] > 0 for s in (1, 2, 3, 4, 5, 7, 8)), (where, leg["legs"])
            # [Note: kept leg grads]: every step that waited and used the leg stepped it from the grads
            # kept where backward left them (planned at the first download: the same chunks)
            assert [bool(k) for k in leg["kept"]] == [bool(n) for n in leg["legs"]], (where, leg["kept"], leg["legs"])
            refused = by_share.get("refused")
            if refused is not None:  # planned, then refused at the verdict: down then, the host step's result
                assert refused["norms"] == host["norms"] and refused["snap"] == host["snap"], where
                assert refused["legs"] == refused["kept"] == [0] * len(SCHEDULE), where


@pytest.mark.parametrize("block, message", [
    ({"offload_optimizer": {"device": "cpu", "device_share": 1.5}}, "out of range"),
    ({"offload_optimizer": {"device": "cpu", "device_share": "half"}}, "not a number"),
    ({"offload_optimizer": {"device": "nvme", "nvme_path": "/tmp/x", "device_share": 0.3}}, 'needs device "cpu"'),
    ({"offload_optimizer": {"device": "cpu", "device_share": 0.3}, "bf16_optimizer_states": True}, 'state_dtype "fp32"'),
    ({"offload_optimizer": {"device": "cpu", "device_share": 0.3},
      "offload_param": {"device": "nvme", "nvme_path": "/tmp/x"}}, 'offload_param not on "nvme"'),
    ({"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu", "device_share": 0.3}},
     "belongs under"),
])
def test_device_share_refused_where_it_cannot_apply(block, message):
    block = dict(block)
    bf16 = {"bf16": {"enabled": True, "bf16_optimizer_states": True}} if block.pop("bf16_optimizer_states", False) else {}
    with pytest.raises(ConfigError, match="device_share") as error:
        load_config({"zero_optimization": {"stage": 3, **block}, **bf16})
    assert message in str(error.value)


def test_device_share_reaches_the_engine_setting():
    from hf_zero.engine.options import engine_options

    config = load_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "device_share": 0.4}},
                          "bf16": {"enabled": False}, "fp16": {"enabled": False}})
    assert config.zero.offload_optimizer.device_share == 0.4
    assert engine_options(config)["offload"].device_share == 0.4
    with pytest.raises(ValueError, match="device_share"):
        OptimizerOffload("nvme", nvme_path="/tmp/x", device_share=0.2)


# ---- through the Trainer: clipping at every step, the run report ------------------------------------


def _worker_first():
    """A Trainer that lets the worker start the chunk queued before the norm is taken
    (test_speculation_trainer): which steps speculate is then the policy's choice, not the timing's."""
    from transformers import Trainer

    from hf_zero.trainer import session as S

    class WorkerFirst(Trainer):
        def _clip_grad_norm(self, model):
            let_the_worker_start(S.session_of(self).engine, every_chunk=True)
            return super()._clip_grad_norm(model)

    return WorkerFirst


def _trainer_job(rank, world, out):
    import os

    from transformers import TrainingArguments

    import hf_zero.trainer as zt
    from hf_zero.trainer import session as S
    from tests.trainer import tiny

    WorkerFirst = _worker_first()
    runs = {}
    for share in (0.0, 1.0):  # (the tiny model is one chunk: share 1 sends it to the leg)
        name = f"share{share}"
        model, data = tiny.offload_job()
        args = TrainingArguments(output_dir=os.path.join(out, name), use_cpu=True, report_to="none", max_steps=4,
                                 per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                                 max_grad_norm=1e-3, logging_steps=1, disable_tqdm=True, seed=0, save_strategy="no")
        zt.activate({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "device_share": share}}})
        try:
            trainer = WorkerFirst(model=model, args=args, train_dataset=data)
            trainer.train()
            engine = S.session_of(trainer).engine
            engine.settle()
            stepped = engine.device_leg.stepped_chunks if engine.device_leg is not None else None
            with engine.gathered():
                params = {n: _bits(p) for n, p in model.named_parameters()}
        finally:
            zt.deactivate()
        report = run_report(os.path.join(out, name))["ranks"][rank]
        history = trainer.state.log_history
        runs[share] = {"train": [(h["step"], h["loss"], h["grad_norm"]) for h in history if "loss" in h],
                       "params": params, "leg": report["device_leg"], "redone": report["host_steps_redone"],
                       "stepped": stepped}
    return runs


def test_device_leg_through_the_trainer(tmp_path):
    """The Trainer clipping at every step (threshold 1e-3): after the first step speculation waits
    for the norm, and the waiting chunk goes to the leg; losses, grad norms and params are the
    host step's bit for bit, and the run report counts what the leg stepped."""
    (runs,) = run_on_ranks(_trainer_job, 1, str(tmp_path), timeout=300)
    host, leg = runs[0.0], runs[1.0]
    assert len(host["train"]) == 4 and leg["train"] == host["train"]
    assert leg["params"] == host["params"]
    assert host["leg"] is None
    assert host["stepped"] is None and leg["stepped"] == 3  # steps 1-3 waited (step 0 speculated)
    # (the report is written at the end of training: the last step's leg may still be queued then)
    assert leg["leg"]["share"] == 1.0 and leg["leg"]["chunks"] in (2, 3) and leg["leg"]["elements"] > 0, leg["leg"]
    # [Note: kept leg grads]: the waiting steps' leg stepped the grads backward left on the device
    assert leg["leg"]["kept_grad_elements"] > 0, leg["leg"]
    assert leg["redone"] == host["redone"] == 1  # the first step speculated and was redone


def test_no_room_on_the_device_keeps_every_chunk_on_the_cpu(monkeypatch, caplog):
    """[Note: leg room]: chunks go to the device only while it had room at the run's peak for the
    two largest chosen chunks in flight (18 bytes an element) beyond 5% of its memory; otherwise
    the step chooses none, counts itself and warns once."""
    from hf_zero.engine.offload import device_room
    from hf_zero.engine.offload.device_leg import DeviceLeg
    from hf_zero.engine.offload.host_memory import HostMemory

    numel = [100, 300, 200, 400]  # the share 0.9 of 1000 takes chunks 3, 2, 1 (900 elements)
    leg = DeviceLeg(0.9, numel, torch.device("cpu"), None, HostMemory(pin=False))
    assert leg.choose([0, 1, 2, 3], lambda c: True) == [3, 2, 1]  # CPU: no device memory to ask about
    total = 10_000
    need = 18 * (400 + 300) + int(0.05 * total)  # the two largest chosen, and the margin
    room = {"free": need}
    monkeypatch.setattr(device_room, "headroom", lambda device: (room["free"], total))
    assert leg.choose([0, 1, 2, 3], lambda c: True) == [3, 2, 1]
    assert leg.no_room_steps == 0
    room["free"] = need - 1
    with caplog.at_level("WARNING", logger="hf_zero.engine.offload.device_leg"):
        assert leg.choose([0, 1, 2, 3], lambda c: True) == []
        assert leg.choose([0, 1, 2, 3], lambda c: True) == []
    assert leg.no_room_steps == 2
    assert sum("leg room" in r.getMessage() for r in caplog.records) == 1  # one line, the first time
    assert leg.choose([0], lambda c: True) == [0]  # one small chunk: 18 * 100 + 500 fits
    assert leg.summary()["no_room_steps"] == 2


def test_kept_grads_need_room_for_themselves_too(monkeypatch):
    """[Note: kept leg grads]: ``keep`` plans the chunks ``choose`` would take, where the device
    has room for their grads (4 bytes an element) beside the two largest in flight (14 bytes an
    element each: their grads are there already) and the margin; otherwise none. ``choose`` at the
    verdict counts a kept chunk in flight at 14 bytes."""
    from hf_zero.engine.offload import device_room
    from hf_zero.engine.offload.host_memory import HostMemory

    numel = [100, 300, 200, 400]
    leg = DeviceLeg(0.9, numel, torch.device("cpu"), None, HostMemory(pin=False))
    assert leg.keep([0, 1, 2, 3], lambda c: True) == [3, 2, 1]  # CPU: no device memory to ask about
    assert leg.keep([0, 1, 2, 3], lambda c: c != 2) == [3, 1, 0]  # chunk 2 without state yet: not the leg's
    total = 10_000
    need = 14 * (400 + 300) + 4 * (400 + 200 + 300) + int(0.05 * total)
    room = {"free": need}
    monkeypatch.setattr(device_room, "headroom", lambda device: (room["free"], total))
    assert leg.keep([0, 1, 2, 3], lambda c: True) == [3, 2, 1]
    room["free"] = need - 1
    assert leg.keep([0, 1, 2, 3], lambda c: True) == []
    assert leg.no_room_steps == 0  # a plan, not a step: nothing counted, nothing said
    room["free"] = 14 * (400 + 300) + int(0.05 * total)  # the verdict, the grads kept: 14 bytes in flight
    assert leg.choose([0, 1, 2, 3], lambda c: True, kept={3, 2, 1}) == [3, 2, 1]
    assert leg.choose([0, 1, 2, 3], lambda c: True) == []  # not kept: 18 bytes would not fit


def _resume_job(rank, world, out):
    import os

    from transformers import TrainingArguments

    import hf_zero.trainer as zt
    from hf_zero.trainer import session as S
    from tests.trainer import tiny

    WorkerFirst = _worker_first()
    runs = {}
    for share in (0.0, 1.0):
        for name in ("full", "resumed"):
            run_dir = os.path.join(out, f"share{share}")
            resume = os.path.join(run_dir, "checkpoint-2") if name == "resumed" else None
            model, data = tiny.offload_job()
            args = TrainingArguments(output_dir=run_dir, use_cpu=True, report_to="none", max_steps=4,
                                     per_device_train_batch_size=2, per_device_eval_batch_size=2,
                                     gradient_accumulation_steps=2, learning_rate=1e-2, max_grad_norm=1e-3,
                                     logging_steps=1, disable_tqdm=True, seed=0, save_strategy="steps", save_steps=2,
                                     eval_strategy="steps", eval_steps=2)
            zt.activate({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "device_share": share}}})
            try:
                trainer = WorkerFirst(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
                trainer.train(resume_from_checkpoint=resume)
                engine = S.session_of(trainer).engine
                engine.settle()
                with engine.gathered():
                    params = {n: _bits(p) for n, p in model.named_parameters()}
            finally:
                zt.deactivate()
            leg = run_report(run_dir)["ranks"][rank]["device_leg"]
            history = trainer.state.log_history
            runs[(share, name)] = {"train": [(h["step"], h["loss"], h["grad_norm"]) for h in history if "loss" in h],
                                   "eval": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h],
                                   "params": params, "kept": None if leg is None else leg["kept_grad_elements"]}
    return runs


def test_kept_grads_through_the_trainer_with_eval_save_and_resume(tmp_path):
    """[Note: kept leg grads] at W = 2, stage 3, the Trainer clipping at every step with an
    evaluation and a checkpoint at step 2 and a resume from it: the leg (share 1: every waiting
    chunk) steps kept grads, and the runs, full and resumed, end bit for bit as the host step's."""
    for runs in run_on_ranks(_resume_job, 2, str(tmp_path), timeout=300):
        host, leg = runs[(0.0, "full")], runs[(1.0, "full")]
        assert len(host["train"]) == 4 and leg["train"] == host["train"] and leg["eval"] == host["eval"]
        assert leg["params"] == host["params"]
        assert host["kept"] is None and leg["kept"] > 0
        for share in (0.0, 1.0):
            full, resumed = runs[(share, "full")], runs[(share, "resumed")]
            assert resumed["params"] == full["params"], share
            assert [t for t in resumed["train"] if t[0] > 2] == [t for t in full["train"] if t[0] > 2], share
        assert runs[(1.0, "resumed")]["kept"] > 0  # the resumed run's waiting steps kept theirs too
