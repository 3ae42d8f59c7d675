"""CPU checkpointing (``activation_checkpointing.cpu_checkpointing``): checkpointed layers' inputs on the host.

Under gradient checkpointing a layer keeps only its input for the backward recompute. Both of torch's
checkpoint implementations save that input through autograd's saved-tensor mechanism, outside their own
hooks (reentrant: ``CheckpointFunction``'s ``save_for_backward``; non-reentrant: ``_NoopSaveInputs``), so
``torch.autograd.graph.saved_tensors_hooks`` around the checkpoint call sees exactly the layer's input,
and nothing saved inside the layer. torch's ``save_on_cpu`` is that hook pair with a blocking copy on
the compute stream (what transformers' ``activation_checkpointing_kwargs={"offload": true}`` uses).
``CheckpointOffload`` is the same ``saved_tensors_hooks`` subclass with three things added:

* the device-to-host copy runs on a side stream (``Streams.ckpt_d2h``) into pinned memory, so forward
  does not wait for it; the device tensor is kept for that stream with ``record_stream``;
* backward brings inputs back one layer ahead: unpacking layer L's input (its recompute starts) starts
  the host-to-device copy of layer L-1's input on ``Streams.ckpt_h2d``, which overlaps layer L's
  recompute and backward; the consumer waits on that copy's event only;
* the host memory is bounded and reused (``HostBuffers``: ``number_checkpoints``,
  ``contiguous_memory_optimization``);
* a forward's first ``on_device`` inputs (``device_checkpoints``) stay where they are, for a host
  that cannot hold them all: counted while autograd holds them (``_Held``), so each forward keeps
  its own first ones, and never copied.

[Note: checkpoint offload timeline] one forward and backward of layers 0..2 (CUDA):

    compute:  L0 fwd | L1 fwd | L2 fwd | ... | L2 recompute+bwd | L1 recompute+bwd | L0 ...
    d2h:        x0->host  x1->host  x2->host
    h2d:                                 x2->dev (at once) x1->dev ....... x0->dev .......
                                         ^ unpack x2        ^ prefetch x1 while L2 runs

On CPU there are no streams: the "device" tensor is already in host memory, but the copies still go
through separate ``HostBuffers`` buffers (pack copies in, unpack and prefetch copy out), so the
machinery runs, and is tested, exactly as on CUDA. The values are copied, never converted: training
with and without the offload is bit for bit the same.
"""

from __future__ import annotations

import enum
import threading
import weakref

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.profiler import record_function

from hf_zero.activations.host_buffers import HostBuffers
from hf_zero.engine.streams import Streams


class Residence(enum.Enum):
    """Where an offloaded tensor is: ON_HOST -> (PREFETCHED ->) RETURNED; unpacked again (a second
    backward over a retained graph) it is copied back again."""

    ON_HOST = "on host"
    PREFETCHED = "a device copy is on its way"
    RETURNED = "handed back to autograd"


class _Packed:
    """One offloaded tensor: its host copy, where it goes back to, and a prefetched device copy."""

    __slots__ = ("__weakref__", "host", "device", "copied", "state", "prefetched", "ready")

    def __init__(self, host: torch.Tensor, device: torch.device, copied) -> None:
        self.host = host  # a view of a HostBuffers buffer in the tensor's shape and dtype
        self.device = device
        self.copied = copied  # CUDA event: the device-to-host copy is done (None on CPU)
        self.state = Residence.ON_HOST
        self.prefetched: torch.Tensor | None = None  # PREFETCHED: the device copy
        self.ready = None  # PREFETCHED on CUDA: the event of its host-to-device copy


class _Held:
    """A checkpoint input kept on the device (``device_checkpoints``), counted while autograd holds it."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class OffloadCounts:
    """What the offload did, for tests and the profiler-minded: packs, unpacks, prefetches that were
    used, tensors kept as they are (not offloadable), inputs held on the device (``on_device``)."""

    __slots__ = ("packed", "unpacked", "prefetched", "kept", "held")

    def __init__(self) -> None:
        self.packed = self.unpacked = self.prefetched = self.kept = self.held = 0


def _concrete(device: torch.device) -> torch.device:
    """``device`` as tensors report it: "cpu" (the Trainer's ranks say "cpu:0"), "cuda:N" (never bare "cuda")."""
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class CheckpointOffload(saved_tensors_hooks):
    """Saved-tensor hooks that put a checkpoint's inputs in host memory (see the module docstring).

    One instance serves a whole model: enter it around each checkpoint call (``with offload:``), as
    ``checkpoint_layers.OffloadedCheckpoint`` does. Tensors that are empty, not contiguous or not on
    ``device`` are kept as they are (counted in ``counts.kept``). ``on_device``: while fewer than this
    many inputs held on the device are alive, the next one is held too (``device_checkpoints``)."""

    def __init__(self, device: torch.device | str, buffers: HostBuffers, on_device: int = 0) -> None:
        self.device = _concrete(torch.device(device))
        self.streams = Streams.for_device(self.device)
        self.buffers = buffers
        self.on_device = on_device
        self.counts = OffloadCounts()
        self._order: list[weakref.ref] = []  # packed records of the current forward, in pack order
        self._lock = threading.Lock()  # pack (forward thread) vs unpack (autograd's device thread)
        self._held = 0  # inputs held on the device that autograd still holds
        self._held_lock = threading.Lock()  # (its own: a _Held may be dropped while _lock is taken)
        super().__init__(self._pack, self._unpack)

    @property
    def held_now(self) -> int:
        """Inputs held on the device that autograd still holds (``device_checkpoints``)."""
        return self._held

    def _hold(self, tensor: torch.Tensor) -> _Held | None:
        """``tensor`` held on the device if fewer than ``on_device`` are (else None)."""
        with self._held_lock:
            if self._held >= self.on_device:
                return None
            self._held += 1
            self.counts.held += 1
        held = _Held(tensor)
        weakref.finalize(held, self._let_go)
        return held

    def _let_go(self) -> None:
        with self._held_lock:
            self._held -= 1

    def _pack(self, tensor: torch.Tensor):
        if tensor.numel() == 0 or not tensor.is_contiguous() or tensor.device != self.device \
                or tensor.layout is not torch.strided:
            self.counts.kept += 1
            return tensor
        held = self._hold(tensor) if self.on_device else None
        if held is not None:
            return held
        with record_function("hf_zero::checkpoint_offload::d2h"):
            buf = self.buffers.acquire(tensor.numel() * tensor.element_size())
            host = buf[: tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
            copied = None
            stream = self.streams.ckpt_d2h
            if stream is None:
                host.copy_(tensor)
            else:
                stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor is written
                with torch.cuda.stream(stream):
                    host.copy_(tensor, non_blocking=True)
                    copied = stream.record_event()
                tensor.record_stream(stream)  # its memory is not reused before the copy has read it
        packed = _Packed(host, tensor.device, copied)
        weakref.finalize(packed, self.buffers.release, buf)  # autograd dropped it: the buffer is free again
        with self._lock:
            self._order = [r for r in self._order if r() is not None]
            self._order.append(weakref.ref(packed))
            self.counts.packed += 1
        return packed

    def _unpack(self, packed):
        if isinstance(packed, _Held):
            with self._lock:
                self.counts.unpacked += 1
            return packed.tensor
        if not isinstance(packed, _Packed):
            return packed
        with record_function("hf_zero::checkpoint_offload::h2d"):
            with self._lock:
                self.counts.unpacked += 1
                out, ready = packed.prefetched, packed.ready
                packed.prefetched = packed.ready = None
                packed.state = Residence.RETURNED
                earlier = self._next_in_backward(packed)
                if earlier is not None:
                    earlier.state = Residence.PREFETCHED
            if out is None:
                out, ready = self._to_device(packed)
            else:
                self.counts.prefetched += 1
            if earlier is not None:  # one layer ahead: its copy overlaps this layer's recompute and backward
                earlier.prefetched, earlier.ready = self._to_device(earlier)
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
            return out

    def _next_in_backward(self, packed: _Packed) -> _Packed | None:
        """The live record packed last before ``packed`` that is still only on the host."""
        records = [r() for r in self._order]
        index = next((i for i, r in enumerate(records) if r is packed), 0)
        return next((r for r in reversed(records[:index]) if r is not None and r.state is Residence.ON_HOST), None)

    def _to_device(self, packed: _Packed):
        """A new device tensor with the host copy's values, and the event to wait on (None: ready)."""
        out = torch.empty(packed.host.shape, dtype=packed.host.dtype, device=packed.device)
        stream = self.streams.ckpt_h2d
        if stream is None:
            out.copy_(packed.host)
            return out, None
        stream.wait_stream(torch.cuda.current_stream(self.device))  # out's allocation comes first
        with torch.cuda.stream(stream):
            stream.wait_event(packed.copied)  # the forward's copy to the host is done
            out.copy_(packed.host, non_blocking=True)
            return out, stream.record_event()


__all__ = ["CheckpointOffload", "OffloadCounts", "Residence"]
