"""``Range``: a half-open interval of flat-buffer elements.

Coordinate systems (see [Note: vocabulary] in ``hf_zero/engine/__init__.py``):
- buffer range: offsets into a ``FlatParamBuffer`` (``ParamSlot.range``, ``Bucket.range``).
- shard range: the local rank's part of a bucket, in buffer coordinates (``Bucket.shard``).
- local range: offsets inside one shard, 0-based (where a piece sits in the main grad shard).

Worked example, W = 2, PARAM_ALIGN = 32 (layout.py), one bucket holding params a (80 elements)
and b (3): a sits at [0, 80), b at [96, 99) (starts aligned to 32), and the bucket is padded to
128 (a multiple of 32 W), so each shard is 64 elements. Rank 0 owns buffer range [0, 64), all of
it a[0:64]: one piece, a -> local [0, 64). Rank 1 owns [64, 128): a[64:80], 16 pad elements,
b[0:3], 29 pad: pieces a -> local [0, 16) and b -> local [32, 35).
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
