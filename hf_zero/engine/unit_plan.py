"""Which params make up each stage-3 unit (``plan_units``): blocks of the model's
``_no_split_modules`` and the root, trainable and frozen params apart, small params moved out
([Note: persistent unit] in units.py). No tensors are touched here."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
from torch import nn


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules whose class is in the model's ``_no_split_modules``, in order."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks, inside = [], set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def _by_unit(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> list[tuple[nn.Module, list]]:
    """(unit module, its (name, param)s) for every block and the root, in backward order: last block
    first, root (module ``model``) last; groups may be empty."""
    blocks = find_blocks(model)
    owner: dict[int, int] = {}
    for b, block in enumerate(blocks):
        for p in block.parameters():
            owner.setdefault(id(p), b)
    per_block: list[list] = [[] for _ in blocks]
    root: list = []
    for name, p in named:
        (per_block[owner[id(p)]] if id(p) in owner else root).append((name, p))
    return [(blocks[b], per_block[b]) for b in reversed(range(len(blocks)))] + [(model, root)]


def group_by_unit(model: nn.Module, named: list[tuple[str, nn.Parameter]], param_dtype: torch.dtype | None):
    """Trainable params grouped by unit, in backward order: last block first, root last.

    Returns (unit modules, groups of (name, param)); the root's module is ``model`` itself."""
    order = [(m, ps) for m, ps in _by_unit(model, named) if ps]
    for module, params in order:
        dtypes = {param_dtype or p.dtype for _, p in params}
        if len(dtypes) > 1:
            raise ValueError(
                f"stage 3 needs one dtype per unit; {type(module).__name__} has trainable params of "
                f"{sorted(map(str, dtypes))}: load the model in one dtype or enable bf16/fp16"
            )
    return [m for m, _ in order], [ps for _, ps in order]


class UnitPlan(NamedTuple):
    """What one unit will hold: module ``None`` is a persistent group (trainable params only)."""

    module: nn.Module | None
    trainable: list  # (name, param), forward order: one FlatParamBuffer (empty: none)
    frozen: list  # (name, param), forward order: one frozen UnitBuffer per dtype


def plan_units(model: nn.Module, trainable: list, frozen: list, threshold: int,
               param_dtype: torch.dtype | None) -> list[UnitPlan]:
    """Units in backward order, then the persistent groups ([Note: persistent unit]).

    A block with only frozen params is still a unit (gathered around its forward and backward).
    Params of fewer than ``threshold`` elements leave their units: trainable ones for persistent
    groups (one per dtype, placed last), frozen ones stay whole on every rank. Units left empty go.
    ``threshold`` 0: nothing moves."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"param_persistence_threshold must be an integer >= 0 (elements), got {threshold!r}")
    group_by_unit(model, trainable, param_dtype)  # one dtype per unit, checked

    def big(params: list) -> list:
        return [(n, p) for n, p in params if p.numel() >= threshold]

    plans = []
    for (module, t), (_, f) in zip(_by_unit(model, trainable), _by_unit(model, frozen)):
        if big(t) or big(f):
            plans.append(UnitPlan(module, big(t), big(f)))
    small: dict[torch.dtype, list] = defaultdict(list)
    for _, params in reversed(_by_unit(model, trainable)):  # forward order of units, as FlatParamBuffer expects
        for n, p in params:
            if p.numel() < threshold:
                small[param_dtype or p.dtype].append((n, p))
    return plans + [UnitPlan(None, params, []) for params in small.values()]
