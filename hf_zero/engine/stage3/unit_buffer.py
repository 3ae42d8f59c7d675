"""One flat buffer of a stage-3 unit and this rank's shard of it (``UnitBuffer``).

A unit (units.py) owns up to a few of these, gathered and dropped together:

- its trainable part: the unit's trainable params in one ``FlatParamBuffer`` (in ``param_dtype``
  when given). Its shard is what the fp32 master shard mirrors and the optimizer updates.
- its frozen parts: the unit's frozen params (``requires_grad=False``, e.g. a LoRA base), one
  buffer per dtype, in the model's own dtype (a bf16 base under fp32 adapters stays bf16). No
  gradient bucket, fp32 master, optimizer piece or reduce-scatter: only gathered and dropped.

[Note: frozen gather] When all parts of a unit have one dtype (an fp32 model, or a bf16 run of a
bf16 base), their shards are kept back to back in one tensor and gathered by one all-gather per
unit; rank r's block of the output then holds every part's shard r, so each part's full buffer
is copied out of it (as FSDP2's all-gather copy-out): one kernel, and the output lives until the
copies are made. When the dtypes differ (fp32 adapters on a bf16 base), an all-gather moves one
dtype, so each part gets its own all-gather, all launched back to back in the same
``launch_gather`` (on CUDA they queue together on the gather stream) and waited for together:
one more collective's latency per unit, no copy.

With parameter offload the shards (``local``) live on the host ([Note: host shards] in units.py):
``start_gather`` then gathers from a device copy of the shard that the unit has just uploaded.

[Note: full storage] Each part gathers into one tensor kept for its life (``full``, as FSDP2's
all-gather outputs): a gather (re)allocates its storage, a release frees it (``storage.resize_(0)``).
Autograd saves views of the weights for backward (``nn.Linear`` saves ``weight.t()``, a view made
while the unit was gathered): a view keeps the storage it was made on, not the param. A fresh
tensor per gather would stay alive through such views from a unit's forward to its backward, every
unit's at once (the whole model at the end of forward, tests/engine/test_stage3_memory.py); on the
one storage, the release frees the bytes under the views, and the backward's gather (before any of
the unit's backward runs: its pre-backward hook) fills the same storage again, which they read.
So a tensor taken from a gathered param (``p.detach()``, a view) holds its values only while the
unit stays gathered: code that keeps one past the release copies it (``clone``), as with FSDP2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from hf_zero.engine import collectives as C
from hf_zero.engine.layout import FlatParamBuffer


class PendingGather(NamedTuple):
    """One part's all-gather in flight: the collective and its output."""

    handle: C.Handle
    full: torch.Tensor


class UnitBuffer:
    """One part of a unit: its flat buffer (one bucket) and the local shard that outlives gathers."""

    def __init__(self, buffer: FlatParamBuffer, ctx: C.CommContext, *, trainable: bool, persistent: bool = False):
        if len(buffer.buckets) != 1:
            raise AssertionError("a stage-3 unit buffer is one bucket")
        self.buffer, self.bucket, self.trainable = buffer, buffer.buckets[0], trainable
        self.numel = self.bucket.range.size  # full elements, padding included: the same on every rank
        self.single, self.persistent = ctx.world_size == 1, persistent
        self.on_host = False  # parameter offload: ``local`` is a host tensor (ParamUnit.__init__)
        if ctx.world_size == 1:
            self.local = buffer.data  # its shard is the whole buffer: the params stay views of it
        else:
            shard = buffer.view(self.bucket.shard)
            self.local = shard if persistent else shard.clone()
        self._empty = torch.empty(0, dtype=buffer.dtype, device=buffer.device)
        self._full: torch.Tensor | None = None  # [Note: full storage]; made at the first gather

    def materialize(self, device: torch.device, fill, local: torch.Tensor | None = None) -> None:
        """Give a part built on the meta device real storage on ``device``: ``fill(buffer, range, out)``
        writes the buffer's elements ``range`` into ``out`` (materialize.py). Only this rank's shard
        is allocated and filled, unless the params stay whole (one rank, or a persistent unit).
        ``local``: where the shard goes (a fused unit's slice), else a new tensor."""
        buf = self.buffer
        whole = self.single or self.persistent
        r = self.bucket.range if whole else self.bucket.shard
        out = local if local is not None else torch.empty(r.size, dtype=buf.dtype, device=device)
        fill(buf, r, out)  # before the swap below: a source may read the meta params' shapes
        buf.device = device
        self._empty = torch.empty(0, dtype=buf.dtype, device=device)
        for param in buf.params:  # a meta tensor's .data cannot be set to another device's: swap it
            if param.device != device:
                torch.utils.swap_tensors(param, nn.Parameter(self._empty, param.requires_grad))
        if whole:
            self.attach(out)
        self.local = buf.view(self.bucket.shard) if self.persistent and not self.single else out

    @property
    def params(self) -> list:
        return self.buffer.params

    def start_gather(self, ctx: C.CommContext, label: str, shard: torch.Tensor | None = None) -> PendingGather:
        """All-gather ``shard`` (default ``local``; with parameter offload its device copy). At one
        rank an uploaded shard already is the full buffer: nothing to gather."""
        shard = self.local if shard is None else shard
        if ctx.world_size == 1 and shard is not self.local:
            return PendingGather(C.Handle(None, shard), shard)
        # Allocated on the current stream (the gather stream: ``launch_gather``).
        full = self.alloc_full()
        return PendingGather(C.start_all_gather(ctx, full, shard, label=label), full)

    def alloc_full(self) -> torch.Tensor:
        """The part's full tensor with its storage allocated, on the current stream ([Note: full storage])."""
        buf, full = self.buffer, self._full
        if full is None or full.device != buf.device or full.dtype != buf.dtype:
            self._full = torch.empty(self.numel, dtype=buf.dtype, device=buf.device)
            return self._full
        storage = full.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(self.numel * full.element_size())
        elif storage.nbytes() != self.numel * full.element_size():
            raise AssertionError(f"full storage of {storage.nbytes()} bytes, expected 0 or {self.numel * full.element_size()}")
        return full

    def attach(self, full: torch.Tensor) -> None:
        """Every param's ``.data`` becomes its slice of the gathered ``full``."""
        self.buffer.data = full
        for param, slot in zip(self.buffer.params, self.buffer.slots):
            param.data = full[slot.range.start : slot.range.end].view(self.buffer.shapes[slot.name])

    def detach(self) -> None:
        """Params point at an empty tensor; the full storage is freed, also under autograd's saved
        views of it ([Note: full storage])."""
        for param in self.buffer.params:
            param.data = self._empty
        self.buffer.data = None
        if self._full is not None and self._full.untyped_storage().resizable():
            self._full.untyped_storage().resize_(0)
        else:  # shared with numpy (``Tensor.numpy()`` of a CPU view, e.g. a save): the next gather makes a new one
            self._full = None

    def keep_edits(self) -> None:
        """Copy the gathered buffer's local shard into the shard kept between gathers."""
        if self.buffer.data is not None and self.local.data_ptr() != self.buffer.data.data_ptr():
            self.local.copy_(self.buffer.view(self.bucket.shard))

    def held_bytes(self, full: torch.Tensor | None, persistent: bool) -> int:
        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        local = 0 if self.on_host else nbytes(self.local)  # a host shard is counted as host memory
        if full is None:
            return local
        if full is self.local or persistent:  # the shard is the full buffer, or a view of it
            return nbytes(full)
        return nbytes(full) + local


def frozen_buffers(params: list[tuple[str, torch.nn.Parameter]], ctx: C.CommContext) -> list[UnitBuffer]:
    """A unit's frozen params (forward order) as one ``UnitBuffer`` per dtype, in the params' own dtype."""
    by_dtype: dict[torch.dtype, list] = {}
    for name, p in params:
        by_dtype.setdefault(p.dtype, []).append((name, p))
    return [UnitBuffer(FlatParamBuffer(ps, world_size=ctx.world_size, rank=ctx.rank, bucket_numel=2**62), ctx,
                       trainable=False)
            for ps in by_dtype.values()]
