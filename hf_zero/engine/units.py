"""Stage 3 parameter units: a module whose trainable params live as a 1/W shard between uses.

A unit is one block of the model's ``_no_split_modules`` (a decoder layer, a T5 block), or the
root (everything else: embeddings, final norm, LM head). Its params are packed into a
``FlatParamBuffer`` with a single bucket; the rank keeps only its shard (``local``) and the
full flat tensor exists only while the unit is UNSHARDED:

    forward:   pre-hook -> unshard (all-gather) ... post-hook -> reshard (not the root)
    backward:  first grad of the unit's outputs -> unshard; last param grad -> reshard

While SHARDED every param's ``.data`` is an empty tensor; autograd keeps the Parameter objects,
so the data put back by the next unshard is what backward reads.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

from hf_zero.engine import collectives as C
from hf_zero.engine.layout import FlatParamBuffer


class UnitState(enum.Enum):
    SHARDED = "sharded"
    UNSHARDED = "unsharded"


class ParamUnit:
    """One stage-3 unit: its module, its flat buffer (one bucket) and its local shard."""

    def __init__(self, index: int, module: nn.Module, buffer: FlatParamBuffer, ctx: C.CommContext, root: bool):
        if len(buffer.buckets) != 1:
            raise AssertionError("a stage-3 unit is one bucket")
        self.index, self.module, self.buffer, self.ctx, self.root = index, module, buffer, ctx, root
        self.bucket = buffer.buckets[0]
        # One rank: its shard is the whole unit, so the params stay views of it (nothing to gather).
        self.single = ctx.world_size == 1
        self.local = buffer.data if self.single else buffer.view(self.bucket.shard).clone()
        self.backward_pending = False  # set between the pre-backward hook and the last param grad
        self._empty = torch.empty(0, dtype=buffer.dtype, device=buffer.device)
        self.state = UnitState.UNSHARDED
        self.reshard()

    def unshard(self) -> None:
        """Idempotent: gather the full params and point every param at its slice."""
        if self.state is UnitState.UNSHARDED:
            return
        full = torch.empty(self.bucket.range.size, dtype=self.buffer.dtype, device=self.buffer.device)
        C.wait(C.start_all_gather(self.ctx, full, self.local))
        self.buffer.data = full
        for param, slot in zip(self.buffer.params, self.buffer.slots):
            param.data = full[slot.range.start : slot.range.end].view(self.buffer.shapes[slot.name])
        self.state = UnitState.UNSHARDED

    def reshard(self) -> None:
        """Idempotent: drop the full params, keep the shard."""
        if self.state is UnitState.SHARDED or self.single:
            return
        for param in self.buffer.params:
            param.data = self._empty
        self.buffer.data = None
        self.state = UnitState.SHARDED

    def held_bytes(self) -> int:
        full = 0
        if self.buffer.data is not None and self.buffer.data is not self.local:
            full = self.buffer.data.numel() * self.buffer.data.element_size()
        return full + self.local.numel() * self.local.element_size()


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


def output_tensors(output) -> list[torch.Tensor]:
    """Tensors in a module's output (tensor, tuple, list, dict, ModelOutput) that need a grad."""
    found, stack = [], [output]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            if item.requires_grad:
                found.append(item)
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found
