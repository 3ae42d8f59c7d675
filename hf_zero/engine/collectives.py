"""Collectives as start/wait pairs with typed handles, and the per-step collective counter.

Every collective of the training step goes through this file, so the per-step counts in
``hf_zero_report.json`` are complete. Two one-off broadcasts outside the step are not counted: the
layout agreed after the first backward, and ``gathered(modifier_rank=...)`` write-backs. At world size 1 no collective is issued: the "reduce" of
one rank is a copy, and that is not counted.

``wait_*`` is idempotent: waiting on a finished handle again does nothing.

Every collective started here is also noted in the flight recorder (``flight_recorder.RECORDER``: a
sequence number, the kind, an optional ``label`` such as a stage-3 unit's name, the bytes, the
start time; ``wait`` marks it done), in local memory only. The watchdog thread reads it to stop a
job whose ranks disagree on the next collective; see ``watchdog.py``.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch
import torch.distributed as dist

from hf_zero.engine.diagnostics import watchdog
from hf_zero.engine.diagnostics.flight_recorder import RECORDER

# torch >= 2.13 names the tensor-to-tensor collectives *_single; older releases only have the
# *_into_tensor / *_tensor spellings. Same semantics.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CommContext:
    """The process group the engine talks over, and how many collectives of each kind it issued."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.counts: Counter[str] = Counter()
        if self.world_size > 1:
            watchdog.ensure_running()  # this rank's hang watchdog (idempotent; comm_timeout_s 0: none)

    def take_counts(self) -> dict[str, int]:
        """Counts since the last call (one optimizer step when called once per step)."""
        out = dict(self.counts)
        self.counts.clear()
        return out


class Handle(NamedTuple):
    """An in-flight collective: ``work`` is None when it completed synchronously; ``record`` is its
    flight-recorder entry (None at world size 1)."""

    work: dist.Work | None
    output: torch.Tensor
    record: object | None = None


def _issue(kind: str, label: str | None, big: torch.Tensor, output: torch.Tensor, issue, *args, **kwargs) -> Handle:
    rec = RECORDER.start(kind, label, big)  # before issuing: a call that blocks is already on record
    try:
        work = issue(*args, **kwargs)
    except BaseException:
        RECORDER.discard(rec)
        raise
    if RECORDER.watched:
        rec.work = work  # lets the watchdog see a handle dropped without wait() complete
    return Handle(work, output, rec)


def start_reduce_scatter(ctx: CommContext, output: torch.Tensor, input: torch.Tensor, label: str | None = None) -> Handle:
    """Sum ``input`` (W shards back to back) over ranks; rank r receives shard r in ``output``.

    ``label`` names what is reduced in a hang report (e.g. a stage-3 unit); None: kind and size only."""
    if ctx.world_size == 1:
        output.copy_(input)
        return Handle(None, output)
    ctx.counts["reduce_scatter"] += 1
    return _issue("reduce_scatter", label, input, output, _reduce_scatter, output, input, group=ctx.group, async_op=True)


def start_all_gather(ctx: CommContext, output: torch.Tensor, input: torch.Tensor, label: str | None = None) -> Handle:
    """Concatenate every rank's ``input`` into ``output`` (``input`` may alias its own slot)."""
    if ctx.world_size == 1:
        if input.data_ptr() != output.data_ptr():
            output.copy_(input)
        return Handle(None, output)
    ctx.counts["all_gather"] += 1
    return _issue("all_gather", label, output, output, _all_gather, output, input, group=ctx.group, async_op=True)


def start_all_reduce(ctx: CommContext, tensor: torch.Tensor, label: str | None = None) -> Handle:
    """Sum ``tensor`` over ranks in place."""
    if ctx.world_size == 1:
        return Handle(None, tensor)
    ctx.counts["all_reduce"] += 1
    return _issue("all_reduce", label, tensor, tensor, dist.all_reduce, tensor, group=ctx.group, async_op=True)


def wait(handle: Handle) -> torch.Tensor:
    """Block (the current stream, on GPU) until the collective is done; return its output."""
    if handle.work is not None:
        handle.work.wait()
    if handle.record is not None:
        RECORDER.done(handle.record, handle.output)
    return handle.output
