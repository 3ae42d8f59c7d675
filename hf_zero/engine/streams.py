"""Every CUDA stream hf_zero uses besides the current (compute) stream, declared here and only here.

One ``Streams`` is made per engine from the device its params live on (``Streams.for_device``);
on CPU every stream is None and the code that would use one runs on the caller's thread, with
async collective handles as its only concurrency. Add a new stream as one more field with one
comment, and build it in ``for_device``.

[Note: gather stream] Stage-3 prefetch (units.py), one unit U:

    compute:  alloc full(U) --rec--> ... layer k forward ...  --wait(ev, work)--> layer U forward
    gather:               \\--wait-->  all-gather(U) launch --ev-->
    NCCL:                              [ all-gather(U) into full(U) ]

* ``full(U)`` is allocated on the compute stream, so the caching allocator ties its block to it;
* the gather stream waits for the compute stream (so the allocation, and the last optimizer
  step's write of the shard, come first), then the collective is launched from it and an event
  ``ev`` is recorded after the launch;
* the consumer makes the compute stream wait on the collective (``Work.wait`` orders the current
  stream after NCCL's) and on ``ev``, before any kernel reads ``full(U)``;
* ``full(U)`` is freed only after that wait (a unit never drops a tensor a gather still
  writes), so its memory is reused by compute kernels ordered after the collective:
  ``Tensor.record_stream`` is not needed.

With parameter offload ([Note: host shards] in units.py) the gather stream first copies U's host
shard (pinned) into a device tensor and the all-gather reads that copy; ``ev`` then also marks
the copy done (``ParamUnit.settle_host`` waits on it before the host writes the shard again):

    gather:   \\--wait--> [h2d copy of shard(U)] all-gather(U) launch --ev-->
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Streams:
    """The side streams of one engine; every field is None on a non-CUDA device."""

    device: torch.device
    gather: "torch.cuda.Stream | None" = None
    """Stage-3 parameter all-gathers, launched ahead of use (prefetch) so that they overlap the
    compute of the unit before; high priority, as FSDP2's, so a gather is not queued behind a long
    compute kernel. See [Note: gather stream]."""
    d2h: "torch.cuda.Stream | None" = None
    """Optimizer offload: reduced grads of offloaded buckets copied down to the host, off the
    compute stream (host_step.py)."""
    h2d: "torch.cuda.Stream | None" = None
    """Optimizer offload: updated params copied up from the host after the host step, off the
    compute stream (host_step.py)."""

    leg: "tuple[torch.cuda.Stream, torch.cuda.Stream] | None" = None
    """Optimizer offload's device leg: chunks of the host step stepped on the device, alternately on
    these two so that one chunk's copies up overlap the other's copies down ([Note: device leg]
    in offload/device_leg.py)."""

    ckpt_d2h: "torch.cuda.Stream | None" = None
    """CPU checkpointing: checkpointed layers' inputs copied to pinned host memory during forward
    (hf_zero/activations/checkpoint_offload.py, [Note: checkpoint offload timeline])."""
    ckpt_h2d: "torch.cuda.Stream | None" = None
    """CPU checkpointing: those inputs copied back one layer ahead during backward (same note)."""

    @classmethod
    def for_device(cls, device: torch.device | str) -> "Streams":
        device = torch.device(device)
        if device.type != "cuda":
            return cls(device=device)
        return cls(device=device, gather=torch.cuda.Stream(device=device, priority=-1),
                   d2h=torch.cuda.Stream(device=device), h2d=torch.cuda.Stream(device=device),
                   leg=(torch.cuda.Stream(device=device), torch.cuda.Stream(device=device)),
                   ckpt_d2h=torch.cuda.Stream(device=device), ckpt_h2d=torch.cuda.Stream(device=device))

    @contextlib.contextmanager
    def launch_gather(self, device: torch.device) -> Iterator[list]:
        """Run the enclosed collective launch on the gather stream, ordered after the current
        stream's work so far; the yielded list receives the event to wait on (empty: none)."""
        events: list = []
        if self.gather is None or torch.device(device) != self.device:
            yield events  # CPU, or a unit on another device: launch from the current stream
            return
        self.gather.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.gather):
            yield events
            events.append(self.gather.record_event())

    def wait_event(self, events: list) -> None:
        """Make the current stream wait for the events ``launch_gather`` recorded."""
        for event in events:
            torch.cuda.current_stream(self.device).wait_event(event)
