"""``ShardedBucket``: everything one rank holds for one reduce bucket ([Note: vocabulary] in ``__init__``).

One per grad bucket, in launch order (``ZeroEngine.buckets``):

    grad      the bucket's gradient runtime (``GradBucket``: staging, reduce-scatter, main grad)
    unit      stage 3: the ``ParamUnit`` whose trainable params the bucket holds (else None)
    shard()   this rank's param shard (a view of the flat buffer; stage 3: the unit's, maybe a
              host shard)
    master    the fp32 master of the shard (a view of the shard when the model is fp32; on the
              host or in a swap file when ``offloaded``); None until the optimizer comes
    pieces    one ``Piece`` per full param meeting the shard: what the optimizer steps
    offloaded its master, optimizer state and step live off the GPU (offload.py, host_step.py)

Lifecycle per step: grads are pointed at the pieces (``point_grads``), the optimizer steps the
masters, ``write_back`` copies them into the param shard, and the post-step gather
(``start_gather`` / ``wait_gather``) rebuilds the full params of buckets that stay whole between
steps (stages 1-2; stage 3 only the persistent unit, the others gather at their next use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from hf_zero.engine import collectives as C
from hf_zero.engine.grad_sync import GradBucket
from hf_zero.engine.ranges import Range
from hf_zero.engine.stage3.units import ParamUnit


@dataclass(frozen=True)
class Piece:
    """One full param's part of a bucket's local shard, as the optimizer sees it."""

    param: nn.Parameter  # the full param (the model's)
    piece: nn.Parameter  # a slice of the bucket's master: what the optimizer steps
    local: Range  # the piece's range in the bucket's shard (0-based)


class ShardedBucket:
    """One reduce bucket of this rank: its grads, param shard, fp32 master and optimizer pieces."""

    def __init__(self, index: int, grad: GradBucket, unit: ParamUnit | None = None) -> None:
        self.index, self.grad, self.unit = index, grad, unit
        self.master: torch.Tensor | None = None
        self.pieces: list[Piece] = []
        self.offloaded = False
        self._pointed = None  # what point_grads set last: [Note: pointed once]
        self._cleared = None  # the pieces clear_grads cleared, while nothing was pointed since

    @property
    def buffer(self):
        return self.grad.buffer

    @property
    def params(self) -> list[nn.Parameter]:
        """The full params of this bucket, in slot order."""
        return [self.grad.buffer.params[s] for s in self.grad.bucket.slots]

    @property
    def shard_numel(self) -> int:
        return self.grad.bucket.shard_size

    def shard(self) -> torch.Tensor:
        """This rank's param shard (stage 3: the unit's local shard, maybe in host memory)."""
        return self.unit.local if self.unit is not None else self.grad.buffer.view(self.grad.bucket.shard)

    def write_shard(self, source: torch.Tensor) -> None:
        """``shard() = source`` (cast): through the unit's host memory with parameter offload (NVMe:
        a file write, nvme_params.py), else a copy."""
        if self.unit is not None and self.unit.host is not None:
            self.unit.host.write(self.shard(), source)
        else:
            self.shard().copy_(source)

    def settle_shard(self) -> None:
        """Before the CPU writes a host shard: no upload reads it any more (parameter offload)."""
        if self.unit is not None:
            self.unit.settle_host()

    @property
    def stays_whole(self) -> bool:
        """Whether the full params are rebuilt right after the step (else at their next use)."""
        return self.unit is None or self.unit.persistent

    # ---- with the optimizer ----------------------------------------------------------------------

    def build_master(self, host_step=None) -> None:
        """The fp32 master of the shard: on the host step's tier if offloaded (``host_step``), a
        device copy of a host shard, or the shard itself when it is fp32 already."""
        shard = self.shard()
        host = self.unit.host if self.unit is not None else None
        if host is not None:  # read through staging, not the file's mapping ([Note: shards written back])
            staged = host.stage(shard.detach())
            if self.offloaded:
                self.master = host_step.master(self.index, staged)
            else:  # a host shard, a device optimizer
                self.master = staged.to(self.grad.buffer.device, torch.float32, copy=True)
            host.done_with(staged, self.master.device)
        elif self.offloaded:
            self.master = host_step.master(self.index, shard.detach())
        else:
            self.master = shard if shard.dtype == torch.float32 else shard.detach().float()
        self.pieces = [Piece(self.grad.buffer.params[slot], nn.Parameter(self.master[r.start : r.end]), r)
                       for slot, r in self.grad.buffer.pieces(self.grad.bucket)]

    def keep_pieces(self, stepped: set[nn.Parameter]) -> None:
        """Drop the pieces of params the optimizer does not update (they get no state)."""
        self.pieces = [p for p in self.pieces if p.param in stepped]

    def point_grads(self, grad_shard: torch.Tensor, unused: set[nn.Parameter]) -> None:
        """Each piece's grad: its slice of ``grad_shard``; params without a gradient on any rank
        get none (the optimizer then leaves them alone, as under DDP)."""
        # [Note: pointed once] Called several times a step (the run report, the norm, clipping,
        # the step's pre-hook): the slices are made once while the shard and the pieces' grads
        # stay the ones set here (host time between the GPU's kernels at the step; issue 21).
        pointed = self._pointed
        if pointed is not None and pointed[0] is grad_shard and pointed[1] is unused and pointed[3] is self.pieces \
                and all(p.piece.grad is g for p, g in zip(self.pieces, pointed[2])):
            return
        grads = [None if p.param in unused else grad_shard[p.local.start : p.local.end] for p in self.pieces]
        for p, g in zip(self.pieces, grads):
            p.piece.grad = g
        self._pointed = (grad_shard, unused, grads, self.pieces)

    def clear_grads(self) -> None:
        if self._pointed is None and self._cleared is self.pieces:
            return  # cleared already, nothing pointed since (the engine's and the Trainer's zero_grad)
        for p in self.pieces:
            p.piece.grad = None
        self._pointed, self._cleared = None, self.pieces

    @torch.no_grad()
    def take_full(self) -> None:
        """The full params were overwritten (``gathered(modifier_rank=...)``): the shard and the
        master follow them."""
        shard = self.shard()
        if self.unit is not None:  # stage 3: the unit's local shard is not a view of the full buffer
            self.write_shard(self.grad.buffer.view(self.grad.bucket.shard))
        if self.master is not None and self.master.data_ptr() != shard.data_ptr():
            self.master.copy_(shard)

    # ---- after the optimizer step ----------------------------------------------------------------

    @torch.no_grad()
    def write_back(self, uploaded: bool) -> None:
        """The new master into the param shard. ``uploaded``: the host step already did it for an
        offloaded bucket (else, a resume without a step, it is copied up now)."""
        shard = self.shard()
        if self.offloaded:
            if not uploaded:
                self.write_shard(self.master.to(shard.device, non_blocking=True))
        elif self.master.data_ptr() != shard.data_ptr():
            self.write_shard(self.master)

    def start_gather(self, ctx: C.CommContext) -> C.Handle:
        """All-gather the shards into the full params (pair: ``C.wait``)."""
        with record_function("hf_zero::start_param_all_gather"):
            return C.start_all_gather(ctx, self.grad.buffer.view(self.grad.bucket.range), self.shard(),
                                      label=f"params of bucket {self.index}")

    def master_bytes(self) -> int:
        """Bytes of a master that is a copy (0 when it views the shard), on whatever tier holds it."""
        if self.master is None or self.master.data_ptr() == self.shard().data_ptr():
            return 0
        return self.master.numel() * self.master.element_size()
