"""Boxes: a run of a tensor's flat (row-major) elements as a few rectangular blocks.

A rank's part of a param is a flat element range ``[start, end)`` (the engine cuts flat buffers
anywhere). ``torch.distributed.checkpoint`` describes a tensor's parts as rectangular blocks
(offsets and sizes per dim), so that a checkpoint written with one cut loads with any other.
A flat range of a tensor of shape (d0, d1, ..., dk) is at most 2k + 1 boxes: a partial first
row, a block of whole rows, a partial last row, each partial row split the same way one
dimension down. Each box is itself a contiguous flat run, so it is a plain view of the range.

Worked example, shape (3, 4), range [2, 11): row 0 from column 2 -> offsets (0, 2) sizes (1, 2);
row 1 whole -> (1, 0) (1, 4); row 2 up to column 3 -> (2, 0) (1, 3).
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Box(NamedTuple):
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    start: int  # its first element, as an offset into the flat range's own tensor (0-based)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def boxes(shape: tuple[int, ...], start: int, end: int) -> list[Box]:
    """The boxes covering flat elements ``[start, end)`` of a row-major tensor of ``shape``, in
    flat order; ``Box.start`` counts from ``start``."""
    if not 0 <= start < end <= math.prod(shape):
        raise ValueError(f"flat range [{start}, {end}) is not inside a tensor of shape {tuple(shape)}")
    return [Box(o, s, first - start) for o, s, first in _boxes(tuple(shape), start, end, 0)]


def _boxes(shape: tuple[int, ...], start: int, end: int, base: int) -> list[tuple[tuple, tuple, int]]:
    """(offsets, sizes, absolute flat start) for ``[start, end)`` relative to a sub-tensor at ``base``."""
    if len(shape) <= 1:
        return [((start,) if shape else (), (end - start,) if shape else (), base + start)]
    inner = math.prod(shape[1:])
    rest = tuple(shape[1:])
    out: list[tuple[tuple, tuple, int]] = []
    first_row, last_row = start // inner, (end - 1) // inner
    if first_row == last_row:  # inside one row: go one dimension down
        for o, s, f in _boxes(rest, start - first_row * inner, end - first_row * inner, base + first_row * inner):
            out.append(((first_row, *o), (1, *s), f))
        return out
    row = first_row
    if start % inner:  # partial first row
        for o, s, f in _boxes(rest, start % inner, inner, base + row * inner):
            out.append(((row, *o), (1, *s), f))
        row += 1
    whole_end = end // inner  # rows [row, whole_end) are whole
    if whole_end > row:
        out.append(((row,) + (0,) * len(rest), (whole_end - row, *rest), base + row * inner))
    if end % inner:  # partial last row
        for o, s, f in _boxes(rest, 0, end % inner, base + whole_end * inner):
            out.append(((whole_end, *o), (1, *s), f))
    return out
