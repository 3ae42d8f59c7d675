"""Filling the shards of stage-3 units built on the meta device, from a ``ParamSource``.

A model built on the meta device (hf_zero/init) has params with shapes and dtypes but no
storage. The engine lays it out as usual (``FlatParamBuffer``s on meta cost nothing), then
``materialize_units`` gives each unit real storage for *this rank's shard only* and asks the
source for the elements that fall in it: for every param that meets the shard, the run of its
flat (row-major) elements inside the shard. So a rank reads and holds 1/W of the model, plus
the params that stay whole everywhere (one rank; the persistent unit's small params).

A source is anything with:

- ``device``: where the shards go;
- ``unit_start(params)``: called before each unit's reads with the unit's params (all of them,
  whichever this rank reads), on every rank in the same order, so a source may communicate here
  (the relayout of a wrapped model gathers the load's shards: hf_zero/init/relayout.py);
- ``read_into(name, shape, start, end, out)``: write flat elements ``[start, end)`` of the param
  the model calls ``name`` (of full shape ``shape``) into ``out`` (1-D, ``end - start``
  elements, the shard's dtype and device: the source casts);
- ``unit_done(more_units=False)``: called after each unit, to let go of what was opened for it
  (file maps, caches), so that the peak stays one unit's reads above the shards. Every read asked
  for is complete on return, except with ``more_units`` (another unit's reads are asked for right
  after, and ``unit_done`` is called again): then the unit's reads may still run, while those of
  any unit before must be complete; at most two units' reads are outstanding (the checkpoint's
  reads: [Note: parallel reads] in hf_zero/init/parallel_reads.py). The last unit's call is
  without it, so every shard is whole when ``materialize_units`` returns.

Padding between params and at the end of a bucket is zero, as ``FlatParamBuffer`` makes it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from hf_zero.engine.layout import FlatParamBuffer
from hf_zero.engine.ranges import Range
from hf_zero.progress import progress


class ParamSource(Protocol):
    device: torch.device

    def unit_start(self, params: list) -> None: ...

    def read_into(self, name: str, shape: torch.Size, start: int, end: int, out: torch.Tensor) -> None: ...

    def unit_done(self, more_units: bool = False) -> None: ...


def fill_range(source: ParamSource, buffer: FlatParamBuffer, r: Range, out: torch.Tensor) -> None:
    """Write elements ``r`` of ``buffer``'s flat layout into ``out`` (``r.size`` elements)."""
    out.zero_()  # padding
    for slot in buffer.slots:
        inter = slot.range.intersect(r)
        if inter is None:
            continue
        own = inter.shift(slot.range.start)  # the param's own flat elements
        dest = inter.shift(r.start)
        source.read_into(slot.name, buffer.shapes[slot.name], own.start, own.end, out[dest.start : dest.end])


def materialize_units(units: list, source: ParamSource) -> None:
    """Allocate and fill every unit's local shards on ``source.device`` (``ParamUnit.materialize``);
    a progress bar on rank 0, one step per unit (hf_zero/progress.py)."""
    for i, unit in enumerate(progress(units, desc="Filling parameter shards", unit="unit")):
        source.unit_start(unit.params())
        unit.materialize(source.device, lambda buf, r, out: fill_range(source, buf, r, out))
        source.unit_done(more_units=i + 1 < len(units))
