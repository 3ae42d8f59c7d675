"""Which params make up each stage-3 unit (``plan_units``): blocks of the model's
``_no_split_modules`` and the root, trainable and frozen params apart, small params moved out
([Note: persistent unit] in units.py), quantized frozen params left whole. No tensors are touched here.

[Note: quantized frozen params] A unit's frozen params are packed into flat buffers and their
``.data`` re-pointed into them (unit_buffer.py). That is right for a plain ``nn.Parameter`` of a
float dtype, and for nothing else: a bitsandbytes 4-bit base weight (``Params4bit``) is packed
uint8 whose meaning lives in a ``quant_state`` tied to the Parameter object (the original shape,
the absmax per block); ``Int8Params`` is int8 with its scales (``SCB``) on the object too; other
quantizers (HQQ, torchao, fp8 checkpoints) use tensor subclasses or 1-byte dtypes likewise. So a
frozen param stays whole on every rank, outside every unit, as frozen params under the
persistence threshold do, when its class is not ``nn.Parameter`` itself (a subclass or a tensor
subclass, whose ops and attributes hf_zero does not know; this also catches a 4-bit base stored
as bf16, ``bnb_4bit_quant_storage=torch.bfloat16``) or its dtype is not one of
``SHARDABLE_DTYPES`` (integer, bool or 1-byte float storage: quantized). Decided from the class
and dtype alone, so bitsandbytes is never imported. Trainable params (the LoRA adapters of a QLoRA
fine-tune) are sharded as usual. Stages 1-2 never touch frozen params.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
from torch import nn


# Frozen params of these dtypes, as plain ``nn.Parameter``s, are sharded at stage 3; any other stays
# whole ([Note: quantized frozen params]).
SHARDABLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def kept_whole(param: torch.Tensor) -> bool:
    """Whether a frozen ``param`` stays whole on every rank at stage 3 ([Note: quantized frozen params])."""
    return type(param) is not nn.Parameter or param.dtype not in SHARDABLE_DTYPES


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


def param_owners(model: nn.Module, blocks: list[nn.Module]) -> dict[int, int]:
    """``id(param) -> index in blocks`` for every param used by modules of one block only.

    [Note: tied params across units] A param that modules of two units hold (a tie: BERT's MLM
    decoder weight is its word embedding, which lives in the ``BertEmbeddings`` block while the
    decoder runs in the root) is in no block: it joins the root, which is gathered from the model's
    forward to the end of its backward, and whose hooks gather it for every module that holds one
    of its params (``UnitHooks.install``). Kept in the block, it would be resharded when that
    block's forward ends, and the other module would read its empty placeholder."""
    block_of: dict[int, int] = {}
    for b, block in enumerate(blocks):
        for module in block.modules():
            block_of.setdefault(id(module), b)
    users: dict[int, set] = defaultdict(set)  # id(param) -> blocks (None: the root) whose modules hold it
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users[id(p)].add(block_of.get(id(module)))
    return {pid: next(iter(used)) for pid, used in users.items() if len(used) == 1 and None not in used}


def _by_unit(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> list[tuple[nn.Module, list]]:
    """(unit module, its (name, param)s) for every block and the root, in backward order: last block
    first, root (module ``model``) last; groups may be empty. A param tied across units is the
    root's ([Note: tied params across units])."""
    blocks = find_blocks(model)
    owner = param_owners(model, blocks)
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
    groups (one per dtype, placed last), frozen ones stay whole on every rank, as do quantized
    frozen params of any size ([Note: quantized frozen params]). Units left empty go.
    ``threshold`` 0: nothing moves for its size."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"param_persistence_threshold must be an integer >= 0 (elements), got {threshold!r}")
    group_by_unit(model, trainable, param_dtype)  # one dtype per unit, checked

    def big(params: list) -> list:
        return [(n, p) for n, p in params if p.numel() >= threshold]

    frozen = [(n, p) for n, p in frozen if not kept_whole(p)]
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
