"""Whole-parameter access to an engine's model: gather every unit, optionally keep edits, or read a
full state dict unit by unit (stage 3 shards params; stages 1-2 hold them whole already).

``ZeroEngine.gathered`` and ``ZeroEngine.full_state_dict`` are thin wrappers over these.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from hf_zero.engine.stage3.units import UnitState


@contextlib.contextmanager
def gathered(engine, modifier_rank: int | None = None, params=None):
    """Inside: every param (or those in ``params``) holds its full value; stage 3 gathers their
    units, frozen params too (DeepSpeed's ``GatheredParameters``).

    With ``modifier_rank``, edits that rank makes to the params inside are kept: its values are
    broadcast to every rank and written back into the shards (and fp32 master shards) on exit.
    Without it, edits are discarded at stage 3. Call it on every rank with the same ``params``
    (it communicates).
    """
    units = _units_of(engine, params)
    was_sharded = [u.state is UnitState.SHARDED for u in units]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        if modifier_rank is not None:
            _write_back(engine, modifier_rank, units)
        for unit, sharded in zip(units, was_sharded):
            if sharded:
                unit.reshard()


def _units_of(engine, params) -> list:
    """The units holding any of ``params`` (None: all). A param in no unit is whole already."""
    if params is None:
        return list(engine.units)
    wanted = {id(p) for p in ([params] if isinstance(params, torch.Tensor) else params)}
    return [u for u in engine.units if any(id(p) in wanted for p in u.params())]


@torch.no_grad()
def full_state_dict(engine, *, to_cpu_on: int | None = 0) -> dict[str, torch.Tensor] | None:
    """The model's state dict with full values, gathered unit by unit (all ranks must call).

    Rank ``to_cpu_on`` (``None``: every rank) receives CPU copies; other ranks get ``None``.
    Tied params stay one tensor, so ``save_pretrained`` still sees them as tied.
    """
    keep = to_cpu_on is None or engine.ctx.rank == to_cpu_on
    full: dict[nn.Parameter, torch.Tensor] = {}
    for unit in engine.units:
        sharded = unit.state is UnitState.SHARDED
        unit.unshard()
        if keep:
            for p in unit.params():
                full[p] = p.detach().to("cpu", copy=True)
        if sharded:
            unit.reshard()
    if not keep:
        return None
    return {name: full[t] if t in full else t.detach().to("cpu", copy=True)
            for name, t in engine.model.state_dict(keep_vars=True).items()}


@torch.no_grad()
def _write_back(engine, src: int, units: list) -> None:
    """``src``'s values of the gathered params (of ``units`` at stage 3) into every rank's shards
    and fp32 masters (none yet before the optimizer comes: hf_zero/init); with parameter offload to
    NVMe each unit's shards then go to the disk and out of memory ([Note: shards written back] in
    nvme_params.py)."""
    chosen = {id(u) for u in units}
    for b in engine.buckets:
        if b.unit is not None and id(b.unit) not in chosen:
            continue  # not gathered: nothing was edited
        if engine.ctx.world_size > 1:
            _broadcast(engine, b.buffer.view(b.grad.bucket.range), src)
        b.take_full()
    for unit in units:  # stage 3: frozen params, gathered by the caller (gathered())
        for part in unit.frozen:
            if engine.ctx.world_size > 1:
                _broadcast(engine, part.buffer.data, src)
            part.keep_edits()
        unit.write_back_shards()  # every part's edits are in its shards now (its bucket's: above)


def _broadcast(engine, tensor: torch.Tensor, src: int) -> None:
    group = engine.ctx.group
    torch.distributed.broadcast(tensor, src=torch.distributed.get_global_rank(group, src) if group is not None else src,
                                group=group)
