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
        self.label = unit_label(index, module, buffer, root)  # names its gathers in hang reports
        self._empty = torch.empty(0, dtype=buffer.dtype, device=buffer.device)
        self.state = UnitState.UNSHARDED
        self.reshard()

    def unshard(self) -> None:
        """Idempotent: gather the full params and point every param at its slice."""
        if self.state is UnitState.UNSHARDED:
            return
        full = torch.empty(self.bucket.range.size, dtype=self.buffer.dtype, device=self.buffer.device)
        C.wait(C.start_all_gather(self.ctx, full, self.local, label=self.label))
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


def unit_label(index: int, module: nn.Module, buffer: FlatParamBuffer, root: bool) -> str:
    """``"unit 3 (model.layers.2, LlamaDecoderLayer)"``; the root: ``"unit 4 (root, LlamaForCausalLM)"``.

    The module's path is its first param's full name less the name relative to the module."""
    path = "root" if root else "?"
    if not root and buffer.params:
        relative = {id(p): n for n, p in module.named_parameters()}
        full, rel = buffer.slots[0].name, relative.get(id(buffer.params[0]))
        if rel is not None and full.endswith("." + rel):
            path = full[: -len(rel) - 1]
    return f"unit {index} ({path}, {type(module).__name__})"


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


def group_by_unit(model: nn.Module, named: list[tuple[str, nn.Parameter]], param_dtype: torch.dtype | None):
    """Trainable params grouped by unit, in backward order: last block first, root last.

    Returns (unit modules, groups of (name, param)); the root's module is ``model`` itself."""
    blocks = find_blocks(model)
    owner: dict[int, int] = {}
    for b, block in enumerate(blocks):
        for p in block.parameters():
            owner.setdefault(id(p), b)
    per_block: list[list] = [[] for _ in blocks]
    root: list = []
    for name, p in named:
        (per_block[owner[id(p)]] if id(p) in owner else root).append((name, p))
    order = [(blocks[b], per_block[b]) for b in reversed(range(len(blocks))) if per_block[b]]
    if root:
        order.append((model, root))
    for module, params in order:
        dtypes = {param_dtype or p.dtype for _, p in params}
        if len(dtypes) > 1:
            raise ValueError(
                f"stage 3 needs one dtype per unit; {type(module).__name__} has trainable params of "
                f"{sorted(map(str, dtypes))}: load the model in one dtype or enable bf16/fp16"
            )
    return [m for m, _ in order], [ps for _, ps in order]


class UnitHooks:
    """When each unit is gathered and dropped: module hooks for forward, grad hooks for backward."""

    def __init__(self, model: nn.Module, units: list[ParamUnit], buckets: list) -> None:
        self.model, self.units = model, units
        self._unit_of_bucket = {id(b): u for b, u in zip(buckets, units)}

    def install(self) -> list:
        handles = []
        for unit in self.units:
            handles.append(unit.module.register_forward_pre_hook(self._pre_forward(unit)))
            handles.append(unit.module.register_forward_hook(self._post_forward(unit)))
            if unit.root:
                # Root params are also used outside the model's own forward (generate() runs the
                # encoder alone, then the decoder): the modules that own them gather on use too.
                owned = {id(p) for p in unit.buffer.params}
                for module in self.model.modules():
                    if module is not self.model and any(id(p) in owned for p in module.parameters(recurse=False)):
                        handles.append(module.register_forward_pre_hook(self._pre_forward(unit)))
        return handles

    def on_grads_done(self, bucket) -> None:
        """Every gradient of the bucket's unit is in: its full params can go."""
        unit = self._unit_of_bucket[id(bucket)]
        unit.backward_pending = False
        unit.reshard()

    def on_backward_end(self) -> None:
        for unit in self.units:
            unit.backward_pending = False
            unit.reshard()

    @staticmethod
    def _pre_forward(unit: ParamUnit):
        def pre_forward(module, args):
            unit.unshard()
        return pre_forward

    @staticmethod
    def _post_forward(unit: ParamUnit):
        def post_forward(module, args, output):
            tensors = output_tensors(output)
            if tensors:
                def pre_backward(_grad):
                    unit.backward_pending = True
                    unit.unshard()
                torch.autograd.graph.register_multi_grad_hook(tensors, pre_backward, mode="any")
            if unit.backward_pending:
                return  # recomputed inside backward (gradient checkpointing): its backward comes next
            if not unit.root or not tensors:
                unit.reshard()  # the root stays gathered from the model's forward to its backward
        return post_forward
