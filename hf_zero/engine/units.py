"""Stage 3 parameter units: a module whose trainable params live as a 1/W shard between uses.

A unit is one block of the model's ``_no_split_modules`` (a decoder layer, a T5 block), or the
root (everything else: embeddings, final norm, LM head), or the persistent unit. Its params are
packed into a ``FlatParamBuffer`` with a single bucket; the rank keeps only its shard (``local``)
and the full flat tensor exists only while the unit is GATHERING or UNSHARDED:

    forward:   pre-hook -> unshard (wait for its prefetch, or gather now); prefetch the next units
               ... post-hook -> reshard (not the root)
    backward:  first grad of the unit's outputs -> unshard; prefetch the next units in backward
               order; last param grad -> reshard

While SHARDED every param's ``.data`` is an empty tensor; autograd keeps the Parameter objects,
so the data put back by the next unshard is what backward reads.

[Note: prefetch] The first forward records the order in which units are first used (as FSDP2
does); each later forward uses the previous one's order, and backward its reverse. When a unit
is first used in a pass, the units after it are gathered ahead (``start_unshard``, on the gather
stream: streams.py) until their elements reach ``prefetch_numel``, as long as the gathered and
in-flight elements stay within ``max_live_numel``; a unit needed now is gathered whatever the
bound. Every decision reads only what is the same on every rank (the order, unit sizes, states
changed by module hooks), so all ranks issue the same gathers in the same order. The one state
that is not (a unit whose backward is over is resharded when *this rank's* last grad of it
arrives, and a param may get no grad on one rank) is not read: in backward such a unit counts as
released ([Note: live count] in ``_live_numel``). Prefetches not used by the end of the forward
or backward that started them are waited for and dropped.

[Note: persistent unit] Trainable params of fewer than ``param_persistence_threshold`` elements
(norms, biases) leave their units for one persistent unit per dtype: never resharded, its params
are always full; like a stage-2 bucket its grads are reduce-scattered and its updated shard is
all-gathered right after the optimizer step (ZeroEngine._after_step). Gathering them per unit
would cost a collective's latency for a few bytes each.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from typing import NamedTuple

import torch
from torch import nn
from torch.profiler import record_function

from hf_zero.engine import collectives as C
from hf_zero.engine.layout import FlatParamBuffer
from hf_zero.engine.streams import Streams


class UnitState(enum.Enum):
    SHARDED = "sharded"  # only the local shard exists
    GATHERING = "gathering"  # all-gather in flight into a new full tensor (a prefetch)
    UNSHARDED = "unsharded"  # every param's .data is a view of the full flat tensor


class PendingGather(NamedTuple):
    """A unit's all-gather in flight: the collective, its output, and the gather-stream events."""

    handle: C.Handle
    full: torch.Tensor
    events: list


class ParamUnit:
    """One stage-3 unit: its module, its flat buffer (one bucket) and its local shard."""

    def __init__(self, index: int, module: nn.Module, buffer: FlatParamBuffer, ctx: C.CommContext, root: bool,
                 *, persistent: bool = False, streams: Streams | None = None):
        if len(buffer.buckets) != 1:
            raise AssertionError("a stage-3 unit is one bucket")
        self.index, self.module, self.buffer, self.ctx, self.root = index, module, buffer, ctx, root
        self.persistent = persistent
        self.streams = streams if streams is not None else Streams(device=buffer.device)
        self.bucket = buffer.buckets[0]
        self.numel = self.bucket.range.size  # full elements, padding included: the same on every rank
        # One rank: its shard is the whole unit, so the params stay views of it (nothing to gather).
        # Persistent: the shard is a view of the full buffer, as a stage-2 bucket's.
        self.single = ctx.world_size == 1
        if self.single:
            self.local = buffer.data
        else:
            shard = buffer.view(self.bucket.shard)
            self.local = shard if persistent else shard.clone()
        self.backward_pending = False  # set between the pre-backward hook and the last param grad
        self.label = unit_label(index, module, buffer, root, persistent)  # names its gathers in hang reports
        self._empty = torch.empty(0, dtype=buffer.dtype, device=buffer.device)
        self._pending: PendingGather | None = None
        self.state = UnitState.UNSHARDED
        self.reshard()

    def start_unshard(self) -> None:
        """Idempotent: launch the all-gather of the full params ([Note: gather stream] in streams.py)."""
        if self.state is not UnitState.SHARDED:
            return
        with record_function("hf_zero::start_unshard"):
            # Allocated on the current (compute) stream: freed after wait_unshard, in that stream's order.
            full = torch.empty(self.numel, dtype=self.buffer.dtype, device=self.buffer.device)
            with self.streams.launch_gather(full.device) as events:
                handle = C.start_all_gather(self.ctx, full, self.local, label=self.label)
        self._pending = PendingGather(handle, full, events)
        self.state = UnitState.GATHERING

    def wait_unshard(self) -> None:
        """Idempotent: the current stream waits for the gather; every param points at its slice."""
        if self.state is UnitState.UNSHARDED:
            return
        if self.state is not UnitState.GATHERING or self._pending is None:
            raise AssertionError(f"{self.label}: wait_unshard in state {self.state.name}, expected GATHERING")
        pending, self._pending = self._pending, None
        with record_function("hf_zero::wait_unshard"):
            C.wait(pending.handle)  # on CUDA: orders the current stream after the collective
            self.streams.wait_event(pending.events)
        full = pending.full
        self.buffer.data = full
        for param, slot in zip(self.buffer.params, self.buffer.slots):
            param.data = full[slot.range.start : slot.range.end].view(self.buffer.shapes[slot.name])
        self.state = UnitState.UNSHARDED

    def unshard(self) -> None:
        """Idempotent: the full params, now (waits for a prefetch in flight rather than gathering again)."""
        self.start_unshard()
        self.wait_unshard()

    def reshard(self) -> None:
        """Idempotent: drop the full params, keep the shard. A gather in flight is waited for first:
        its output must not be freed (and reused) while the collective still writes it."""
        if self.state is UnitState.SHARDED or self.single or self.persistent:
            return
        if self.state is UnitState.GATHERING:
            self.wait_unshard()
        for param in self.buffer.params:
            param.data = self._empty
        self.buffer.data = None
        self.state = UnitState.SHARDED

    def held_bytes(self) -> int:
        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        full = self._pending.full if self._pending is not None else self.buffer.data
        if full is None:
            return nbytes(self.local)
        if full is self.local or self.persistent:  # the shard is the full buffer, or a view of it
            return nbytes(full)
        return nbytes(full) + nbytes(self.local)


def unit_label(index: int, module: nn.Module, buffer: FlatParamBuffer, root: bool, persistent: bool = False) -> str:
    """``"unit 3 (model.layers.2, LlamaDecoderLayer)"``; the root: ``"unit 4 (root, LlamaForCausalLM)"``;
    ``"unit 5 (persistent, 9 params)"``.

    The module's path is its first param's full name less the name relative to the module."""
    if persistent:
        return f"unit {index} (persistent, {len(buffer.params)} params)"
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


def split_persistent(modules: list, groups: list, threshold: int, param_dtype: torch.dtype | None):
    """Params of fewer than ``threshold`` elements leave their units for persistent groups (one per
    dtype, placed last, module ``None``); units left empty go. ``threshold`` 0: nothing moves."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"param_persistence_threshold must be an integer >= 0 (elements), got {threshold!r}")
    if threshold == 0:
        return modules, groups
    kept: list[tuple] = []
    small: dict[torch.dtype, list] = defaultdict(list)
    for module, params in zip(modules, groups):
        big = [(n, p) for n, p in params if p.numel() >= threshold]
        if big:
            kept.append((module, big))
    for params in reversed(groups):  # forward order of units, as FlatParamBuffer expects
        for n, p in params:
            if p.numel() < threshold:
                small[param_dtype or p.dtype].append((n, p))
    kept += [(None, params) for params in small.values()]
    return [m for m, _ in kept], [g for _, g in kept]


def make_units(model: nn.Module, owners: list, buffers: list[FlatParamBuffer], ctx: C.CommContext,
               streams: Streams) -> list[ParamUnit]:
    """One ParamUnit per buffer; an owner ``None`` is a persistent group (``split_persistent``)."""
    return [ParamUnit(i, owner if owner is not None else model, buf, ctx, root=owner is model,
                      persistent=owner is None, streams=streams)
            for i, (owner, buf) in enumerate(zip(owners, buffers))]


class Phase(enum.Enum):
    IDLE = "idle"  # outside the model's forward and backward: units are gathered on use, nothing ahead
    FORWARD = "forward"  # inside the model's forward: the unit order is recorded, and prefetched from
    BACKWARD = "backward"  # from the first pre-backward hook to the end of backward


class UnitHooks:
    """When each unit is gathered and dropped: module hooks for forward, grad hooks for backward,
    and the prefetch schedule ([Note: prefetch])."""

    def __init__(self, model: nn.Module, units: list[ParamUnit], buckets: list, *,
                 prefetch_numel: int = 0, max_live_numel: int | None = None) -> None:
        for name, value in (("prefetch_bucket_size", prefetch_numel), ("max_live_parameters", max_live_numel)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0 (elements), got {value!r}")
        self.model = model
        self.units = [u for u in units if not u.persistent]  # the persistent unit is never gathered
        self._unit_of_bucket = {id(b): u for b, u in zip(buckets, units)}
        self.prefetch_numel, self.max_live_numel = prefetch_numel, max_live_numel
        self.phase = Phase.IDLE
        self._order: list[ParamUnit] = []  # units in the order the last forward first used them
        self._seen: dict[ParamUnit, None] = {}  # units first used in this pass, in order
        self._current: ParamUnit | None = None  # backward: the unit whose backward started last
        self._prefetched: dict[ParamUnit, None] = {}  # gathered ahead, not used yet
        self.peak_live_numel = 0  # most full elements (gathered or in flight) at once; for tests

    def install(self) -> list:
        # Registered first, so they run before the root unit's hooks on the same module.
        handles = [self.model.register_forward_pre_hook(self._model_pre_forward),
                   self.model.register_forward_hook(self._model_post_forward)]
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
        if unit.persistent:
            return
        unit.backward_pending = False
        self._prefetched.pop(unit, None)
        unit.reshard()

    def on_backward_end(self) -> None:
        self._release_prefetched()
        for unit in self.units:
            unit.backward_pending = False
            unit.reshard()
        self.phase, self._seen, self._current = Phase.IDLE, {}, None

    # ---- the schedule -------------------------------------------------------------------------

    def _model_pre_forward(self, module, args) -> None:
        if self.phase is Phase.BACKWARD:
            self.on_backward_end()  # a backward that reached no param grad never ended for us
        self._release_prefetched()  # left by a forward that raised
        self.phase, self._seen = Phase.FORWARD, {}

    def _model_post_forward(self, module, args, output) -> None:
        if self.phase is Phase.FORWARD:
            if self._seen:
                self._order = list(self._seen)
            self.phase = Phase.IDLE
        self._release_prefetched()  # e.g. a forward that stopped before the last blocks

    def _use(self, unit: ParamUnit) -> None:
        """Unit needed now: its prefetch is waited for, or it is gathered now (whatever the bound)."""
        self._prefetched.pop(unit, None)
        gather = unit.state is UnitState.SHARDED
        unit.unshard()
        if gather:
            self._note_live()

    def _prefetch(self, order: list[ParamUnit], after: ParamUnit | None) -> None:
        """Start gathering the units after ``after`` in ``order`` (None: from the start); see [Note: prefetch]."""
        if self.prefetch_numel == 0:
            return
        if after is not None:
            if after not in order:
                return
            order = order[order.index(after) + 1 :]
        window = 0
        for unit in order:
            if window >= self.prefetch_numel:  # starts at 0: at least one unit is considered
                break
            if unit in self._seen:
                continue  # its use in this pass is over
            window += unit.numel
            if unit.state is not UnitState.SHARDED:
                continue  # gathered or in flight already
            if self.max_live_numel is not None and self._live_numel() + unit.numel > self.max_live_numel:
                break
            with record_function("hf_zero::prefetch"):
                unit.start_unshard()
            self._prefetched[unit] = None
            self._note_live()

    def _live_numel(self) -> int:
        """Full elements gathered or in flight, as every rank counts them.

        [Note: live count] In backward a unit whose backward started before the current one is
        counted as released, even if this rank still holds it: it is dropped when this rank's last
        grad of it arrives, which may come later on one rank than on another (or never, for a
        param unused on this rank). The root stays counted: it is held until backward ends."""
        total = 0
        for unit in self.units:
            if self.phase is Phase.BACKWARD and unit in self._seen:
                total += unit.numel if unit is self._current or unit.root else 0
            elif unit.state is not UnitState.SHARDED:
                total += unit.numel
        return total

    def _note_live(self) -> None:
        live = sum(u.numel for u in self.units if u.state is not UnitState.SHARDED)
        self.peak_live_numel = max(self.peak_live_numel, live)

    def _release_prefetched(self) -> None:
        for unit in self._prefetched:
            unit.reshard()  # waits for a gather still in flight
        self._prefetched.clear()

    # ---- module and grad hooks ----------------------------------------------------------------

    def _pre_forward(self, unit: ParamUnit):
        def pre_forward(module, args):
            first = self.phase is Phase.FORWARD and unit not in self._seen
            if first:
                self._seen[unit] = None
            self._use(unit)
            if first:
                self._prefetch(self._order, after=unit)
        return pre_forward

    def _pre_backward(self, unit: ParamUnit):
        def pre_backward(_grad):
            if self.phase is not Phase.BACKWARD:
                self.phase, self._seen, self._current = Phase.BACKWARD, {}, None
            unit.backward_pending = True
            first = unit not in self._seen
            if first:
                self._seen[unit] = None
                self._current = unit
            self._use(unit)
            if first:  # the root's backward starts first whatever its place: prefetch from the start
                self._prefetch(self._order[::-1], after=None if unit.root else unit)
        return pre_backward

    def _post_forward(self, unit: ParamUnit):
        def post_forward(module, args, output):
            tensors = output_tensors(output)
            if tensors:
                torch.autograd.graph.register_multi_grad_hook(tensors, self._pre_backward(unit), mode="any")
            if unit.backward_pending or self.phase is Phase.BACKWARD:
                return  # recomputed inside backward (gradient checkpointing): its backward comes next
            if not unit.root or not tensors:
                unit.reshard()  # the root stays gathered from the model's forward to its backward
        return post_forward
