"""``ParamShard``: where each trainable param's fp32 master values live, across all ranks.

The engine packs params into buckets (stages 1-2) or units (stage 3), so one param's flat
elements are split between ranks at arbitrary offsets. Code that must not depend on that layout
(sharded checkpoints, resumable at another world size or stage) sees instead, per param: its
name and full shape, which flat element ranges of the param each rank holds (``chunks``), and
this rank's part: the master view and the optimizer's piece.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hf_zero.engine.ranges import Range


@dataclass(frozen=True)
class ParamShard:
    """One trainable param as the engine shards it."""

    name: str
    shape: tuple[int, ...]
    chunks: tuple[tuple[int, Range], ...]  # (rank, range of the param's flat elements), all ranks
    local: Range | None  # this rank's flat range of the param, or None
    master: torch.Tensor | None  # fp32 master values of ``local`` (a view into the master shard)
    piece: nn.Parameter | None  # what the optimizer steps for ``local`` (None: not in the optimizer)


def shard_map(engine) -> list[ParamShard]:
    """Every trainable param of ``engine``, in layout order."""
    out = []
    for b in engine.buckets:
        out += _entries(b.buffer, b.grad.bucket, b.master, engine.ctx.rank, {p.param: p.piece for p in b.pieces})
    return out


def frozen_shard_map(engine) -> list[ParamShard]:
    """Every frozen param sharded in a stage-3 unit (unit_buffer.py); ``master`` is a view of the
    local frozen shard, in the model's dtype, and ``piece`` is None (no optimizer state)."""
    return [e for unit in engine.units for part in unit.frozen
            for e in _entries(part.buffer, part.bucket, part.local, engine.ctx.rank, {})]


def _entries(buf, bucket, shard: torch.Tensor, rank: int, pieces: dict) -> list[ParamShard]:
    out = []
    for slot_index in bucket.slots:
        slot = buf.slots[slot_index]
        chunks = tuple(buf.param_chunks(slot_index))
        local = dict(chunks).get(rank)
        view = None
        if local is not None:
            # the param's local range, in the shard's own 0-based coordinates
            start = slot.range.start + local.start - bucket.shard.start
            view = shard[start : start + local.size]
        out.append(ParamShard(slot.name, tuple(buf.shapes[slot.name]), chunks, local, view,
                              pieces.get(buf.params[slot_index])))
    return out
