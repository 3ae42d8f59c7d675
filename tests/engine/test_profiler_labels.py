"""Every phase of a step shows in a torch.profiler trace under its ``hf_zero::`` label
([Note: profiler labels] in hf_zero/engine/diagnostics/labels.py): one step at W = 2 on gloo ranks, stage 2
with optimizer offload and clipping, and stage 3 with prefetch; a label removed fails here."""

from __future__ import annotations

import torch
from torch._C._profiler import _ExperimentalConfig
from torch.profiler import ProfilerActivity, profile

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.engine.offload.speculation import SpeculationPolicy
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import batch, tiny_llama
from tests.engine.test_speculation import let_the_worker_start

STAGE2_OFFLOAD = {
    "hf_zero::start_reduce_scatter", "hf_zero::wait_reduce_scatter", "hf_zero::grad_download",
    "hf_zero::grad_norm", "hf_zero::clip_grad_norm", "hf_zero::before_step", "hf_zero::host_step",
    "hf_zero::host_step_chunk", "hf_zero::upload", "hf_zero::after_step",
    "hf_zero::start_param_all_gather", "hf_zero::wait_param_all_gather",
}
STAGE3 = {
    "hf_zero::start_unshard", "hf_zero::wait_unshard", "hf_zero::prefetch",
    "hf_zero::start_reduce_scatter", "hf_zero::wait_reduce_scatter", "hf_zero::after_step",
}
OVERLAPPED = {"hf_zero::settle_host_step"}
SPECULATED = {"hf_zero::speculation_keep", "hf_zero::speculation_restore", "hf_zero::clip_grad_norm"}


def _labels(rank: int, **engine_kwargs) -> list[str]:
    """The hf_zero labels of the second step (the first re-packs the buckets) of a tiny model."""
    early = engine_kwargs.pop("early", False)
    speculate = engine_kwargs.pop("speculate", False)  # [Note: speculation]: stands at step 0, redone at step 1
    model = tiny_llama(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = ZeroEngine(model, opt, bucket_numel=3000, **engine_kwargs)
    engine.set_step_in_backward(early, overlap_forward=early, speculation=SpeculationPolicy() if speculate else None)
    wrapped = ZeroModule(model, engine)
    seen = set()
    for step in range(2):
        # the worker thread's spans too (it started in the first step)
        with profile(activities=[ProfilerActivity.CPU], experimental_config=_ExperimentalConfig(profile_all_threads=True)) as prof:
            wrapped(**batch(rank, step, 0, model.config.vocab_size)).loss.backward()
            if not early:
                engine.clip_grad_norm_(1.0)
            elif speculate:
                let_the_worker_start(engine, every_chunk=True)  # (so that a chunk speculates, whatever the timing)
                engine.clip_grad_norm_(1e9 if step == 0 else 1e-3)
            opt.step()
            wrapped.zero_grad()
            engine.settle()
        seen = {e.name for e in prof.events() if e.name.startswith("hf_zero::")}
    engine.close()
    return sorted(seen)


def _on_rank(rank: int, world: int) -> dict[str, list[str]]:
    return {
        "stage2_offload": _labels(rank, stage=2, offload=OptimizerOffload("cpu", chunk_numel=5000)),
        "stage3": _labels(rank, stage=3, prefetch_numel=10_000, persistence_threshold=0),
        "overlapped": _labels(rank, stage=2, offload=OptimizerOffload("cpu", chunk_numel=5000), early=True),
        "speculated": _labels(rank, stage=2, offload=OptimizerOffload("cpu", chunk_numel=5000), early=True,
                              speculate=True),
    }


def test_every_phase_is_labelled():
    for seen in run_on_ranks(_on_rank, 2):
        assert STAGE2_OFFLOAD - set(seen["stage2_offload"]) == set()
        assert STAGE3 - set(seen["stage3"]) == set()
        assert OVERLAPPED - set(seen["overlapped"]) == set()
        assert SPECULATED - set(seen["speculated"]) == set()
