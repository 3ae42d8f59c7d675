"""Flat buffer layout: which full param sits where, and how the buffer is cut into buckets.

``FlatParamBuffer`` packs trainable full params of one dtype into one 1-D tensor, in backward
order (the model's last registered params first), and cuts it into buckets of about
``bucket_numel`` elements (in ``dtype`` when given: the params are cast, as DeepSpeed casts a
bf16 run's model). Each param starts at a multiple of PARAM_ALIGN elements, and each bucket is padded to a multiple of
PARAM_ALIGN * world size so that it
splits into W equal shards. After construction every full param's ``.data`` is a view into
``buffer.data``; nothing else about the param changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hf_zero.engine.ranges import Range

# Each full param starts at a multiple of this many elements, so GPU kernels get aligned views.
PARAM_ALIGN = 32


@dataclass(frozen=True)
class ParamSlot:
    """Where one full param lives: its range in the flat buffer and its bucket."""

    name: str
    range: Range
    bucket: int


@dataclass(frozen=True)
class Bucket:
    """One communication unit: a padded buffer range and the local shard of it."""

    index: int
    range: Range
    shard: Range
    slots: tuple[int, ...]  # indices into FlatParamBuffer.slots

    @property
    def shard_size(self) -> int:
        return self.shard.size


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class FlatParamBuffer:
    """Trainable full params of one dtype and device, packed into one flat tensor."""

    def __init__(
        self,
        named_params: list[tuple[str, nn.Parameter]],
        *,
        world_size: int,
        rank: int,
        bucket_numel: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not named_params:
            raise AssertionError("FlatParamBuffer needs at least one parameter")
        if bucket_numel < 1:
            raise ValueError(f"bucket size must be >= 1 element, got {bucket_numel}")
        first = named_params[0][1]
        self.dtype, self.device = dtype or first.dtype, first.device
        self.world_size, self.rank = world_size, rank
        self.params: list[nn.Parameter] = []
        self.slots: list[ParamSlot] = []
        self.buckets: list[Bucket] = []

        offset, bucket_start, members = 0, 0, []
        for name, param in reversed(named_params):  # backward order
            offset = _round_up(offset, PARAM_ALIGN)
            self.slots.append(ParamSlot(name, Range(offset, offset + param.numel()), len(self.buckets)))
            self.params.append(param)
            members.append(len(self.slots) - 1)
            offset += param.numel()
            if offset - bucket_start >= bucket_numel:
                offset = self._close_bucket(bucket_start, offset, members)
                bucket_start, members = offset, []
        if members:
            offset = self._close_bucket(bucket_start, offset, members)
        self.numel = offset

        self.shapes = {slot.name: param.shape for param, slot in zip(self.params, self.slots)}
        # Stage 3 sets ``data`` to None while the buffer's unit is sharded (see units.py).
        self.data: torch.Tensor | None = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for param, slot in zip(self.params, self.slots):
                view = self.data[slot.range.start : slot.range.end].view_as(param)
                view.copy_(param.data)
                param.data = view

    def _close_bucket(self, start: int, end: int, members: list[int]) -> int:
        padded_end = start + _round_up(max(end - start, 1), self.world_size * PARAM_ALIGN)
        shard_size = (padded_end - start) // self.world_size
        shard = Range(start + self.rank * shard_size, start + (self.rank + 1) * shard_size)
        self.buckets.append(Bucket(len(self.buckets), Range(start, padded_end), shard, tuple(members)))
        return padded_end

    def view(self, r: Range) -> torch.Tensor:
        return self.data[r.start : r.end]

    def pieces(self, bucket: Bucket) -> list[tuple[int, Range]]:
        """(slot index, local range inside the shard) for every param that meets the local shard."""
        out = []
        for i in bucket.slots:
            inter = self.slots[i].range.intersect(bucket.shard)
            if inter is not None:
                out.append((i, inter.shift(bucket.shard.start)))
        return out

    def param_chunks(self, slot_index: int) -> list[tuple[int, Range]]:
        """(rank, range of the param's own flat elements) for every rank that holds part of it:
        where each rank's shard of the param's bucket meets the param (all ranks, not just this one)."""
        slot = self.slots[slot_index]
        bucket = self.buckets[slot.bucket]
        size = bucket.range.size // self.world_size
        out = []
        for q in range(self.world_size):
            shard = Range(bucket.range.start + q * size, bucket.range.start + (q + 1) * size)
            inter = slot.range.intersect(shard)
            if inter is not None:
                out.append((q, inter.shift(slot.range.start)))
        return out
