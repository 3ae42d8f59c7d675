"""``offload_optimizer.device_share: "auto"`` ([Note: leg share] in hf_zero/engine/offload/leg_share.py).

The feedback itself against simulated machines (a leg that pays, one that takes the CPU's
bandwidth, speculating steps), then the engine's wiring: what each waiting step hands the feedback
(elements after the verdict, on each side) is what it stepped, and "auto" changes no bit of the
result (without CUDA the leg is the host step on copies).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from hf_zero.config import ConfigError, load_config
from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.leg_share import LegShare, Phase
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.engine.options import engine_options
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import add_frozen_and_unused, tiny_llama
from tests.engine.test_speculation import _bits, _groups, _snapshot, scheduled_backward

ELEMENTS = 1_000_000


def _machine(alone_ns: float, contended_ns: float, leg_ns: float):
    """A waiting step on a simulated machine: the CPU takes ``alone_ns`` an element alone and
    ``contended_ns`` while the leg runs; the leg ``leg_ns`` an element."""
    def step(share: float) -> tuple[int, float, int, float]:
        leg = int(ELEMENTS * share)
        cpu = ELEMENTS - leg
        return cpu, cpu * (contended_ns if leg else alone_ns) * 1e-9, leg, leg * leg_ns * 1e-9
    return step


def _drive(feedback: LegShare, step, steps: int) -> list[float]:
    per_element = []
    for _ in range(steps):
        cpu, cpu_s, leg, leg_s = step(feedback.share)
        per_element.append(max(cpu_s, leg_s) / ELEMENTS)
        feedback.record(cpu, cpu_s, leg, leg_s)
    return per_element


def test_a_leg_that_pays_settles_where_both_parts_end_together():
    feedback = LegShare()
    # (1.1 ns alone, 1.2 contended, 2 on the leg: both end together at 0.5 / (1 / 1.2 + 0.5) = 0.375)
    per_element = _drive(feedback, _machine(1.1, 1.2, 2.0), 14)
    assert feedback.phase is Phase.TUNING
    assert per_element[:2] == pytest.approx([1.1e-9, 1.1e-9])  # the baseline: share 0 on the first waiting steps
    balance = (1 / 2.0) / (1 / 1.2 + 1 / 2.0)
    assert feedback.share == pytest.approx(balance, abs=2e-3)
    assert per_element[-1] < 0.8 * per_element[0]
    summary = feedback.summary()
    assert summary["phase"] == "tuning" and summary["samples"] == 14
    assert summary["cpu_ns_per_element_alone"] == pytest.approx(1.1)
    assert summary["rates"]["device"] == pytest.approx(0.5e9, rel=1e-6)


def test_a_leg_that_takes_the_cpus_bandwidth_is_turned_off(caplog):
    feedback = LegShare()
    # (the CPU twice as slow while the leg runs: 0.7 x 2.0 > 1.0 alone, at any share the leg takes)
    with caplog.at_level(logging.INFO, logger="hf_zero.engine.offload.leg_share"):
        per_element = _drive(feedback, _machine(1.0, 2.0, 1.5), 10)
    assert feedback.phase is Phase.OFF and feedback.share == 0.0
    assert per_element[2] > per_element[0] and per_element[3] > per_element[0]  # the two misses
    assert per_element[4:] == [per_element[0]] * 6  # then the CPU alone, for good
    assert "did not shorten the host step" in caplog.text


def test_one_miss_is_forgiven_and_the_share_is_bounded():
    feedback = LegShare()
    _drive(feedback, _machine(1.0, 1.0, 1.0), 2)
    assert feedback.phase is Phase.TUNING and feedback.share == LegShare.START
    feedback.record(700_000, 2e-3, 300_000, 1e-4)  # one slow step (a miss), then fast ones again
    assert feedback.phase is Phase.TUNING
    _drive(feedback, _machine(1.0, 1.0, 0.01), 20)  # a leg far faster than the CPU
    assert feedback.phase is Phase.TUNING and feedback.share == pytest.approx(LegShare.LIMIT)


def test_speculating_steps_give_no_sample():
    feedback = LegShare()
    for _ in range(5):
        feedback.record(0, 0.0, 0, 0.0)  # every chunk was stepped in backward
    assert feedback.phase is Phase.BASELINE and feedback.share == 0.0 and feedback.samples == 0
    feedback.record(ELEMENTS, 2e-3, 0, 0.0)
    feedback.record(ELEMENTS, 1e-3, 0, 0.0)
    assert feedback.alone == pytest.approx(1e-9)  # the least of the baseline's steps
    assert feedback.phase is Phase.TUNING


def test_auto_reaches_the_engine_setting():
    config = load_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu",
                                                                                 "device_share": "auto"}},
                          "bf16": {"enabled": False}, "fp16": {"enabled": False}})
    assert engine_options(config)["offload"].device_share == "auto"
    with pytest.raises(ConfigError, match="device_share"):  # (as a number would be, without host state)
        load_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp/x",
                                                                             "device_share": "auto"}}})
    with pytest.raises(ValueError, match="device_share"):
        OptimizerOffload("cpu", device_share="half")


# ---- the engine: what each waiting step hands the feedback ------------------------------------------

CHUNK = 1500


def _run(rank, base, share, records):
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=3000,
                        offload=OptimizerOffload("cpu", chunk_numel=CHUNK, device_share=share))
    wrapped = ZeroModule(model, engine)
    leg = engine.device_leg
    if leg is not None:  # what each step hands the feedback, and what the leg stepped then
        record = leg.auto.record
        leg.auto.record = lambda *a: (records.append((a, leg.stepped_elements)), record(*a))[1]
    for step in range(8):  # the waiting path (no step in backward), clipping at every step
        scheduled_backward(wrapped, model, rank, step, 1.0)
        engine.clip_grad_norm_(1e-3)
        engine.optimizer.step()
        engine.settle()
        wrapped.zero_grad()
    out = {"snap": _snapshot(model, engine), "offloaded": sum(engine._host_step._chunk_numel),
           "summary": leg.summary() if leg is not None else None}
    engine.close()
    return out


def _auto(rank, world):
    base = add_frozen_and_unused(tiny_llama(0, tied=True, layers=2))
    records = []
    host = _run(rank, base, 0.0, [])
    auto = _run(rank, base, "auto", records)
    return host, auto, [(args, stepped) for args, stepped in records]


def test_auto_share_feeds_on_each_waiting_step_and_keeps_the_bits():
    (host, auto, records), = run_on_ranks(_auto, 1, timeout=300)
    assert auto["snap"] == host["snap"]  # (no key differs, none is missing)
    # Every step waited for the norm and handed the feedback a sample, until it turned the leg off
    # (on CPU the leg is the host step on copies, on the same thread: it may well not pay)
    summary = auto["summary"]
    assert summary["share"] == "auto" and summary["elements"] == records[-1][1]
    assert summary["auto"]["samples"] == len(records), (summary, records)
    assert len(records) == 8 if summary["auto"]["phase"] == "tuning" else 2 + LegShare.MISSES <= len(records) <= 8
    total, before = auto["offloaded"], 0
    for (cpu, cpu_s, leg, leg_s), stepped in records:
        assert leg == stepped - before, records  # the leg's elements are what it stepped that step
        before = stepped
        # every offloaded element stepped after the verdict, on one side or the other (the first
        # step too: it creates the state on the host)
        assert cpu + leg == total and cpu_s >= 0 and leg_s >= 0, records
        assert (leg > 0) == (leg_s > 0) and (cpu > 0) == (cpu_s > 0), records
    legs = [r[0][2] for r in records]
    assert legs[:2] == [0, 0] and legs[2] > 0, legs  # the baseline, then the starting share
    assert legs[2] <= LegShare.START * total, legs
