"""Gradient path of ZeRO-1/2: full param grads -> staging -> reduce-scatter -> main grad shard.

Timeline of one backward with 3 buckets (bucket 0 holds the last layers, so it fills first):

    backward:   [ grads of bucket 0 ][ grads of bucket 1 ][ grads of bucket 2 ]
    collective:                      [ RS 0 ]             [ RS 1 ]             [ RS 2 ]
    main grad:                                   += 0                 += 1          += 2 (at finish)

Buckets are launched strictly in index order on every rank (a bucket whose grads are all in
waits for its predecessors), so all ranks issue the same collectives in the same order even
when some params get no gradient on some ranks. Buckets still incomplete when backward ends
are launched then; at most ``MAX_IN_FLIGHT`` reduce-scatters are outstanding, so the staging
memory of stage 2 stays bounded by a few buckets.

[Note: one rank's grads] At W = 1 nothing is reduced, so a bucket's grads go straight into its fp32
main grad (``alias_main``), whatever the model's dtype: a param's first grad of the step is copied
in (a bf16 grad upcast as it is copied), later ones added, and the elements that got none (params
without a grad, alignment padding) are zeroed when the bucket is "reduced". For a bf16 model that
moves 6 bytes an element (read 2, write 4) where staging cost 18: zero a bf16 staging tensor (2),
add the grad into it (6), the one-rank reduce-scatter's copy (4), the upcast into the main grad (6).
The values are the same (a bf16 grad is exact in fp32), except that grads accumulated over
micro-steps are summed in fp32 rather than bf16 at stage 1.
"""

from __future__ import annotations

import enum
from typing import Callable

import torch
from torch.profiler import record_function

from hf_zero.engine import collectives as C
from hf_zero.engine.layout import Bucket, FlatParamBuffer

MAX_IN_FLIGHT = 2


class BucketState(enum.Enum):
    IDLE = "idle"  # no gradient arrived in this backward
    FILLING = "filling"  # some of its params' grads are in the staging tensor
    READY = "ready"  # all grads in; waiting for predecessors to launch
    REDUCING = "reducing"  # reduce-scatter in flight
    REDUCED = "reduced"  # main grad shard updated for this backward


class GradBucket:
    """Runtime state of one bucket's gradients (geometry lives in ``layout.Bucket``)."""

    def __init__(self, buffer: FlatParamBuffer, bucket: Bucket, world_size: int) -> None:
        self.buffer, self.bucket = buffer, bucket
        # One rank: the main grad shard is the whole bucket, so gradients go straight into it (no
        # staging tensor, no copy, no upcast): [Note: one rank's grads].
        self.alias_main = world_size == 1
        # alias_main: slots of the main grad not written since it was made (empty: its first grad copies in)
        self._unwritten: set[int] = set()
        self._padding: list[tuple[int, int]] | None = None  # alias_main: (start, end) of each gap between slots
        self.state = BucketState.IDLE
        self.missing = len(bucket.slots)
        self.staging: torch.Tensor | None = None
        self.handle: C.Handle | None = None
        # fp32, allocated when the first reduction of a step lands and released after the optimizer
        # step, so it takes no memory during forward, when activations peak. None: nothing yet.
        self.main_grad: torch.Tensor | None = None
        # Optimizer offload moved this step's main grad to the host (host_step.py): main_grad is
        # None on purpose, and no zeros are made for it.
        self.main_on_host = False

    def _expect(self, *states: BucketState) -> None:
        if self.state not in states:
            raise AssertionError(f"bucket {self.bucket.index}: state {self.state.name}, expected {[s.name for s in states]}")

    def staging_tensor(self) -> torch.Tensor:
        if self.staging is None and self.alias_main:
            if self.main_grad is None:  # [Note: one rank's grads]: each slot's first grad copies in
                self.main_grad = self._new_main(torch.empty)
                self._unwritten = set(self.bucket.slots)
                self._zero_padding()
            self.staging = self.main_grad
        if self.staging is None:
            self.staging = torch.zeros(self.bucket.range.size, dtype=self.buffer.dtype, device=self.buffer.device)
        return self.staging

    def add_grad(self, slot_index: int, grad: torch.Tensor) -> None:
        self._expect(BucketState.IDLE, BucketState.FILLING)
        r = self.buffer.slots[slot_index].range.shift(self.bucket.range.start)
        into = self.staging_tensor()[r.start : r.end]
        if slot_index in self._unwritten:
            self._unwritten.discard(slot_index)
            into.copy_(grad.reshape(-1))
        else:
            into.add_(grad.reshape(-1))
        self.missing -= 1
        self.state = BucketState.READY if self.missing == 0 else BucketState.FILLING

    def carry_grad(self, slot_index: int, grad: torch.Tensor) -> None:
        """Take over a staged, not yet reduced gradient from a previous layout (re-layout)."""
        r = self.buffer.slots[slot_index].range.shift(self.bucket.range.start)
        self.staging_tensor()[r.start : r.end].copy_(grad)
        self._unwritten.discard(slot_index)
        self.missing -= 1
        self.state = BucketState.READY if self.missing == 0 else BucketState.FILLING

    def start_reduce(self, ctx: C.CommContext) -> None:
        self._expect(BucketState.IDLE, BucketState.FILLING, BucketState.READY)
        with record_function("hf_zero::start_reduce_scatter"):
            staging = self.staging_tensor()
            if self.alias_main:
                self._zero_unwritten()  # params without a grad in this step count as zero
                self.handle = C.Handle(None, self.main_grad)
                self.state = BucketState.REDUCING
                return
            if ctx.world_size > 1:
                staging.div_(ctx.world_size)  # average like DDP; pre-divided to keep bf16 sums in range
            if self.main_grad is None and staging.dtype == torch.float32:
                self.main_grad = out = self._new_main(torch.empty)  # reduce straight into it
            else:
                out = torch.empty(self.bucket.shard_size, dtype=staging.dtype, device=staging.device)
            self.handle = C.start_reduce_scatter(ctx, out, staging, label=f"grads of bucket {self.bucket.index}")
            self.state = BucketState.REDUCING

    def finish_reduce(self) -> bool:
        """Idempotent: wait for the reduce-scatter and fold it into the main grad shard.
        True when this call did it (the bucket just became REDUCED)."""
        if self.state is not BucketState.REDUCING:
            return False
        with record_function("hf_zero::wait_reduce_scatter"):
            out = C.wait(self.handle)
        if out is not self.main_grad:
            if self.main_grad is None:
                self.main_grad = out.float() if out.dtype != torch.float32 else out
            else:
                self.main_grad.add_(out)
        self.handle, self.staging = None, None
        self.state = BucketState.REDUCED
        return True

    def reset_for_backward(self, keep_staging: bool) -> None:
        """Called when a backward ends without communication (stage 1 accumulation)."""
        if not keep_staging:
            self.staging = None
        self.missing = len(self.bucket.slots)
        self.state = BucketState.IDLE

    def held_bytes(self) -> int:
        held = [t for t in (self.staging, self.main_grad) if t is not None]
        if len(held) == 2 and held[0] is held[1]:
            held = held[:1]
        return sum(t.numel() * t.element_size() for t in held)

    def _new_main(self, factory) -> torch.Tensor:
        return factory(self.bucket.shard_size, dtype=torch.float32, device=self.buffer.device)

    def _zero_padding(self) -> None:
        """alias_main: the main grad's elements outside every slot (alignment padding) are zero."""
        if self._padding is None:  # the layout is fixed for the bucket's life: found once, empty gaps left out
            start, ends, gaps = self.bucket.range.start, 0, []
            for i in sorted(self.bucket.slots, key=lambda i: self.buffer.slots[i].range.start):
                r = self.buffer.slots[i].range.shift(start)
                if r.start > ends:
                    gaps.append((ends, r.start))
                ends = r.end
            if self.bucket.shard_size > ends:
                gaps.append((ends, self.bucket.shard_size))
            self._padding = gaps
        for lo, hi in self._padding:
            self.main_grad[lo:hi].zero_()

    def _zero_unwritten(self) -> None:
        for i in self._unwritten:
            r = self.buffer.slots[i].range.shift(self.bucket.range.start)
            self.main_grad[r.start : r.end].zero_()
        self._unwritten = set()

    def ensure_main_grad(self) -> torch.Tensor:
        """The main grad shard; zeros if no gradient reached this bucket in this step (None if
        it went to the host)."""
        if self.main_grad is None and not self.main_on_host:
            self.main_grad = self._new_main(torch.zeros)
            self._unwritten = set()
        return self.main_grad


class GradSync:
    """All grad buckets of the engine, launched in one global order."""

    def __init__(self, ctx: C.CommContext, buckets: list[GradBucket]) -> None:
        self.ctx = ctx
        self.buckets = buckets
        self.next_launch = 0
        self.sync_enabled = True  # False inside ZeroModule.no_sync() (stage 1 accumulation)
        self.peak_grad_bytes = 0
        # Called with each bucket's index as its reduction lands in the main grad (optimizer
        # offload takes it to the host from there, while backward goes on).
        self.on_reduced: Callable[[int], None] | None = None

    def _finish(self, i: int) -> None:
        if self.buckets[i].finish_reduce() and self.on_reduced is not None:
            self.on_reduced(i)

    def on_bucket_progress(self) -> None:
        if self.sync_enabled:
            self._launch_ready(force=False)

    def _launch_ready(self, force: bool) -> None:
        while self.next_launch < len(self.buckets):
            bucket = self.buckets[self.next_launch]
            if not force and bucket.state is not BucketState.READY:
                return
            bucket.start_reduce(self.ctx)
            # The high point: staging of this and the in-flight buckets. At one rank a launch holds
            # nothing more (the main grads only grow as grads arrive; on_backward_end sees them all).
            if not bucket.alias_main:
                self._track_memory()
            self.next_launch += 1
            if self.next_launch > MAX_IN_FLIGHT:
                self._finish(self.next_launch - 1 - MAX_IN_FLIGHT)

    def on_backward_end(self) -> None:
        """Launch what is left (params without grads count as zero), or keep accumulating."""
        if self.sync_enabled:
            self._launch_ready(force=True)
        else:
            for bucket in self.buckets:
                bucket.reset_for_backward(keep_staging=True)
        self._track_memory()

    def finish(self) -> None:
        """Idempotent: every bucket's reduce-scatter done, main grads complete for this step."""
        if any(b.staging is not None for b in self.buckets[self.next_launch :]):
            self._launch_ready(force=True)  # grads accumulated without a synced backward
        for i, bucket in enumerate(self.buckets):
            self._finish(i)
            bucket.ensure_main_grad()
        self._track_memory()

    def start_next_step(self) -> None:
        """After the optimizer step: main grads were consumed; the next backward overwrites them."""
        for bucket in self.buckets:
            bucket.reset_for_backward(keep_staging=False)
            bucket.main_grad = None
            bucket.main_on_host = False
        self.next_launch = 0

    def begin_backward(self) -> None:
        """Called at the first gradient of a backward, after a synced backward has completed."""
        if self.next_launch:
            # A synced backward already ran in this step (stage 2, several micro-steps): its
            # reductions are folded into the main grads, and this backward fills fresh staging.
            for bucket in self.buckets:
                # Not final: another backward follows in this step, so no on_reduced call.
                bucket.finish_reduce()
                bucket.reset_for_backward(keep_staging=False)
            self.next_launch = 0

    def _track_memory(self) -> None:
        self.peak_grad_bytes = max(self.peak_grad_bytes, sum(b.held_bytes() for b in self.buckets))
