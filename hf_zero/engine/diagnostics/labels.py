"""Profiler labels: every phase of a step shows in a ``torch.profiler`` trace as ``hf_zero::...``.

[Note: profiler labels] One ``record_function`` span per phase, per bucket, unit or chunk at
most, never per element or per param, so a label costs a few microseconds a step when no
profiler runs:

    hf_zero::start_reduce_scatter   a grad bucket's reduce-scatter launched (grad_sync.py)
    hf_zero::wait_reduce_scatter    ... waited for and folded into the main grad
    hf_zero::grad_download          an offloaded bucket's main grad copied to the host (grads_down.py)
    hf_zero::grad_norm              the global grad norm (engine.py)
    hf_zero::clip_grad_norm         ... and the clip
    hf_zero::before_step            the optimizer step's pre-hook (the host step runs inside it)
    hf_zero::host_step              the host step of the offloaded buckets, all chunks
    hf_zero::host_step_chunk        one chunk: tier fetch, the optimizer on it, release (worker thread too)
    hf_zero::upload                 a chunk's new masters queued up into the param shards
    hf_zero::settle_host_step       waiting for a host step still running (overlap_forward)
    hf_zero::speculation_keep       a chunk's masters and state copied before its speculative step (speculation.py)
    hf_zero::speculation_restore    ... copied back: clipping was needed, or the step was skipped
    hf_zero::after_step             the post-hook: masters into the param shards, the gathers
    hf_zero::start_param_all_gather a bucket's all-gather of its new params (stages 1-2, persistent units)
    hf_zero::wait_param_all_gather  ... waited for
    hf_zero::start_unshard          a stage-3 unit's gather launched (units.py)
    hf_zero::wait_unshard           ... waited for
    hf_zero::prefetch               the next units' gathers launched ahead of use
    hf_zero::checkpoint_offload::d2h  a checkpointed layer's input queued to the host (activations/checkpoint_offload.py)
    hf_zero::checkpoint_offload::h2d  ... brought back in backward, the layer before it queued ahead
    hf_zero::ulysses_all_to_all       sequence slices traded for attention heads and back (sequence_parallel/all_to_all.py)

tests/engine/test_profiler_labels.py keeps this list true.
"""

from __future__ import annotations

import functools

from torch.profiler import record_function


def labelled(name: str):
    """Decorate a method so each call is one ``record_function(name)`` span. A fresh span per call:
    ``record_function`` used as a decorator itself reuses one object, which two threads (the host
    step's worker and the main thread) or a nested call would share."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)

        return inner

    return wrap
