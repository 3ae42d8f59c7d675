"""Review of session 19's host-step changes (tests/engine/test_review_s19_*.py).

1. [Note: freeing host memory]: ``HostStep.close`` hands its pinned host grads back to
   ``HostMemory.free``, which unregisters an exact buffer at once (and drops the last reference to
   it). A grad download (``download``: a ``non_blocking`` D2H copy on the d2h stream) may still be
   in flight then: ``engine.close()`` after a backward without its optimizer step (or any close
   between ``download`` and ``end_step``) settles only the worker, not the queued downloads in
   ``_in_flight``. Freeing the buffer under a DMA is a use after free; close must wait for them
   first, as ``end_step`` does. On CPU no copy is asynchronous, so the queued download is faked
   with an event that records when it was waited for.

2. [Note: settle mid-step]: a ``set_step_in_backward`` refused mid-step must leave the engine's
   setting as it was. It was stored before the host step refused it: the engine then reported the
   refused setting (``engine.speculation``, the run report's counters) while the host step kept the
   old one, and the next host step built (``place_offload``, ratio "auto" after the first step) took
   the refused setting silently.
"""

from __future__ import annotations

import torch

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.engine.offload.speculation import SpeculationPolicy
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import batch, tiny_llama


class _QueuedCopy:
    """A download's CUDA event, as ``GradsDown._in_flight`` holds it, still running."""

    def __init__(self, log: list) -> None:
        self.log = log

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        self.log.append("download waited for")


def _close_with_a_download_in_flight(rank, world):
    model = tiny_llama(0)
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), stage=2, bucket_numel=3000,
                        offload=OptimizerOffload("cpu", ratio=1.0, chunk_numel=2000))
    wrapped = ZeroModule(model, engine)
    wrapped(**batch(rank, 0, 0, model.config.vocab_size)).loss.backward()
    engine.grad_norm()  # every offloaded grad is down: host grads exist
    step = engine._host_step
    assert step.host_grads
    log: list = []
    i, grad = next(iter(step.host_grads.items()))
    step.grads._in_flight.append((_QueuedCopy(log), torch.empty(grad.numel())))  # its copy into host_grads[i] runs
    step.grads._in_flight_bytes += grad.numel() * 4
    free = step.memory.free
    step.memory.free = lambda t: (log.append("host grad freed"), free(t))
    engine.close()  # without the optimizer step (an exception in between, a script that stops there)
    return log


def test_close_waits_for_the_downloads_in_flight_before_freeing_the_host_grads():
    log = run_on_ranks(_close_with_a_download_in_flight, 1, timeout=120)[0]
    assert "host grad freed" in log, log
    assert "download waited for" in log and log.index("download waited for") < log.index("host grad freed"), log


def _refused_setting_is_not_kept(rank, world):
    model = tiny_llama(0)
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), stage=2, bucket_numel=3000,
                        offload=OptimizerOffload("cpu", ratio=1.0, chunk_numel=2000))
    policy = SpeculationPolicy()
    engine.set_step_in_backward(True, overlap_forward=True, speculation=policy)
    wrapped = ZeroModule(model, engine)
    wrapped(**batch(rank, 0, 0, model.config.vocab_size)).loss.backward()
    assert engine._host_step.mid_step
    try:
        engine.set_step_in_backward(False)
        refused = False
    except RuntimeError:
        refused = True
    out = {"refused": refused, "speculation_kept": engine.speculation is policy,
           "setting": engine._step_in_backward}
    engine.clip_grad_norm_(1.0)
    engine.optimizer.step()
    wrapped.zero_grad()
    # a host step built now (a re-placement) takes the engine's setting: still the one in force
    engine.place_offload(0.5)
    out["rebuilt_early"] = engine._host_step.early
    out["rebuilt_speculation"] = engine._host_step.speculation is not None
    engine.close()
    return out


def test_a_refused_set_step_in_backward_leaves_the_setting_as_it_was():
    out = run_on_ranks(_refused_setting_is_not_kept, 1, timeout=120)[0]
    assert out["refused"], out
    assert out["speculation_kept"] and out["setting"][0] and out["setting"][1], out
    assert out["rebuilt_early"] and out["rebuilt_speculation"], out
