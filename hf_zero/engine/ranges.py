"""``Range``: a half-open interval of flat-buffer elements.

Coordinate systems (see [Note: vocabulary] in ``hf_zero/engine/__init__.py``):
- buffer range: offsets into a ``FlatParamBuffer`` (``ParamSlot.range``, ``Bucket.range``).
- shard range: the local rank's part of a bucket, in buffer coordinates (``Bucket.shard``).
- local range: offsets inside one shard, 0-based (where a piece sits in the main grad shard).

Worked example, W = 2, one bucket of 10 elements holding params a (6 elements) and b (3), padded
to 10: rank 0 owns buffer range [0, 5) (a[0:5]), rank 1 owns [5, 10) (a[5:6], b[0:3], 1 pad).
Rank 1's pieces are a -> local [0, 1) and b -> local [1, 4).
"""

from __future__ import annotations

from typing import NamedTuple


class Range(NamedTuple):
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def intersect(self, other: "Range") -> "Range | None":
        start, end = max(self.start, other.start), min(self.end, other.end)
        return Range(start, end) if start < end else None

    def shift(self, offset: int) -> "Range":
        return Range(self.start - offset, self.end - offset)
