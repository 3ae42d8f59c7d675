"""Stage 3 parameter units: a module whose params live as a 1/W shard between uses.

A unit is one block of the model's ``_no_split_modules`` (a decoder layer, a T5 block), or the
root (everything else: embeddings, final norm, LM head), or the persistent unit (``plan_units``
in unit_plan.py). Its trainable params are packed into a ``FlatParamBuffer`` with a single
bucket, its frozen params into one more per dtype (unit_buffer.py; a block with only frozen
params, such as a LoRA layer without adapters, is a unit all the same). The rank keeps only its
shard of each (``local``), and the full flat tensors exist only while the unit is GATHERING or
UNSHARDED:

    forward:   pre-hook -> unshard (wait for its prefetch, or gather now); prefetch the next units
               ... post-hook -> reshard (not the root)
    backward:  first grad of the unit's outputs -> unshard; prefetch the next units in backward
               order; last param grad -> reshard (with frozen params: [Note: frozen release])

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

[Note: host shards] With parameter offload (``offload_param.device = "cpu"``, ``host`` given) a
unit's shards (each part's ``local``, a fused unit's ``_fused_local``) live in host memory
(``HostMemory``: pinned slabs when CUDA is there), in the params' dtype, and the device holds
nothing of the unit between uses. ``start_unshard`` uploads them into device copies (from pinned
memory, on the gather stream, so a prefetch overlaps the upload as well as the all-gather) and
gathers from those; the copies go once the gather is waited for, the full params at ``reshard``.
At one rank the upload is the full buffer (no collective); such a unit is then resharded like
any other (``single`` is False: its params are no longer views of a shard that stays). The
optimizer step writes the updated params into the host shards (host_step.py), after
``settle_host`` has made sure no upload still reads them. The persistent unit stays on the device.

[Note: compiled forward] Under ``torch.compile`` (the Trainer's ``--torch_compile``, whole model or
accelerate's regional compilation) every unit hook runs eagerly, never traced (``outside_compile``:
``torch.compiler.disable``, as FSDP2 does with its hooks): dynamo breaks the graph around each hook,
so the gathers, prefetches and drops happen between compiled regions, which only ever see a unit's
params gathered, in their full shapes. Traced, a hook's collectives and ``.data`` swaps would be
captured into the graph, and its params' placeholders (empty while SHARDED) seen as their shapes
(issue 21: ``wrong number of dimensions1`` in inductor's code). The break points are the same at
every step, so nothing is recompiled after the first steps (tests/trainer/test_compile.py). The
grad hooks run in autograd's backward, outside the compiled graphs already.

[Note: persistent unit] Trainable params of fewer than ``param_persistence_threshold`` elements
(norms, biases) leave their units for one persistent unit per dtype: never resharded, its params
are always full; like a stage-2 bucket its grads are reduce-scattered and its updated shard is
all-gathered right after the optimizer step (ZeroEngine._after_step). Gathering them per unit
would cost a collective's latency for a few bytes each.
"""

from __future__ import annotations

import enum

import torch
from torch import nn
from torch.profiler import record_function

from hf_zero.engine import collectives as C
from hf_zero.engine.offload.host_memory import HostMemory
from hf_zero.engine.layout import FlatParamBuffer
from hf_zero.engine.streams import Streams
from hf_zero.progress import progress
from hf_zero.engine.stage3.unit_buffer import PendingGather, UnitBuffer, frozen_buffers
from hf_zero.engine.stage3.unit_plan import UnitPlan


class UnitState(enum.Enum):
    SHARDED = "sharded"  # only the local shard exists
    GATHERING = "gathering"  # all-gather in flight into a new full tensor (a prefetch)
    UNSHARDED = "unsharded"  # every param's .data is a view of the full flat tensor


class ParamUnit:
    """One stage-3 unit: its module and its parts (``UnitBuffer``s, gathered together): the trainable
    part (``buffer``, ``bucket``, ``local``; None for a unit of frozen params only) and its frozen
    parts ([Note: frozen gather] in unit_buffer.py)."""

    def __init__(self, index: int, module: nn.Module, buffer: FlatParamBuffer | None, ctx: C.CommContext,
                 root: bool, *, persistent: bool = False, streams: Streams | None = None,
                 frozen: list[UnitBuffer] = (), host: HostMemory | None = None):
        self.index, self.module, self.ctx, self.root = index, module, ctx, root
        self.persistent = persistent
        trainable = [UnitBuffer(buffer, ctx, trainable=True, persistent=persistent)] if buffer is not None else []
        self.parts: list[UnitBuffer] = trainable + list(frozen)
        if not self.parts:
            raise AssertionError(f"unit {index} has no params")
        self.frozen = list(frozen)
        self.streams = streams if streams is not None else Streams(device=self.parts[0].buffer.device)
        self.buffer = buffer
        self.bucket = trainable[0].bucket if trainable else None
        self.local = trainable[0].local if trainable else None
        self.numel = sum(part.numel for part in self.parts)  # full elements of all parts: the same on every rank
        self.host = None if persistent else host  # [Note: host shards]; None: shards on the device
        # One rank: each shard is the whole part, so the params stay views of it (nothing to gather),
        # unless the shard lives on the host.
        self.single = ctx.world_size == 1 and self.host is None
        for part in self.parts:
            part.single = part.single and self.single
            part.on_host = self.host is not None
        # [Note: frozen gather]: parts of one dtype are gathered by one all-gather, their shards
        # kept back to back in one tensor (each part's ``local`` a view of it).
        self._fused = not self.single and not persistent and len(self.parts) > 1 and \
            len({part.buffer.dtype for part in self.parts}) == 1
        if self._fused:
            self._fused_local = self._new_shard([part.local for part in self.parts])
            offset = 0
            for part in self.parts:
                part.local = self._fused_local[offset : offset + part.local.numel()]
                offset += part.local.numel()
        elif self.host is not None:
            for part in self.parts:
                part.local = self._new_shard([part.local])
        self.local = self.parts[0].local if trainable else None
        self._host_reads: list = []  # parameter offload: events after the last uploads (settle_host)
        # Called before each gather, on the gather stream: the optimizer step of this unit's params may
        # still run on the host (host_step.py, [Note: step in backward]); set by the engine.
        self.before_gather = None
        self._uploads: list[torch.Tensor] = []  # parameter offload: device copies of the shards, in flight
        self.backward_pending = False  # set between the pre-backward hook and the unit's backward end
        self.label = unit_label(index, module, self.parts[0].buffer, root, persistent)  # names its gathers
        self._pending: list[PendingGather] | None = None
        self._events: list = []
        self.state = UnitState.UNSHARDED
        self.reshard()
        self.write_back_shards()

    def _new_shard(self, sources: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
        """One tensor holding ``sources`` back to back: in host memory with parameter offload, else on
        ``device`` (default: where the sources are). Sources on the meta device are not copied."""
        numel, dtype = sum(t.numel() for t in sources), sources[0].dtype
        if self.host is not None:
            out = self.host.empty(numel, dtype)
        else:
            out = torch.empty(numel, dtype=dtype, device=device if device is not None else sources[0].device)
        offset = 0
        for t in sources:
            if t.device.type != "meta":
                out[offset : offset + t.numel()].copy_(t.reshape(-1))
            offset += t.numel()
        return out

    def materialize(self, device: torch.device, fill) -> None:
        """Built on the meta device (hf_zero/init): allocate and fill this rank's shards on ``device``
        (``UnitBuffer.materialize``; in host memory with parameter offload); the unit stays in its
        state, its params now on ``device``."""
        # Host shards were allocated (not filled) in __init__ already: they are filled where they are.
        if self._fused:
            if self.host is None:
                self._fused_local = self._new_shard([part.local for part in self.parts], device)
            offset = 0
            for part in self.parts:
                n = part.local.numel()
                part.materialize(device, fill, local=self._fused_local[offset : offset + n])
                offset += n
        else:
            for part in self.parts:
                part.materialize(device, fill, local=part.local if self.host is not None else None)
        self.local = self.parts[0].local if self.buffer is not None else None
        self.write_back_shards()
        if self.state is UnitState.SHARDED:
            for part in self.parts:
                part.detach()  # params point at an empty tensor on ``device`` now

    def params(self) -> list[nn.Parameter]:
        """Every full param of the unit, trainable and frozen."""
        return [p for part in self.parts for p in part.params]

    def start_unshard(self) -> None:
        """Idempotent: launch the all-gathers of every part ([Note: gather stream] in streams.py)."""
        if self.state is not UnitState.SHARDED:
            return
        device = self.parts[0].buffer.device
        with record_function("hf_zero::start_unshard"):
            with self.streams.launch_gather(device) as events:
                if self.before_gather is not None:
                    self.before_gather()
                if self._fused:
                    if self.ctx.world_size == 1:  # uploaded: the upload is the full tensors, each part's
                        # elements straight into its full tensor ([Note: full storage] in unit_buffer.py)
                        uploads = self._upload(self._fused_local, device, [part.alloc_full() for part in self.parts])
                        pending = [PendingGather(C.Handle(None, full), full) for full in uploads]
                    else:
                        uploads = self._upload(self._fused_local, device)
                        out = torch.empty(uploads[0].numel() * self.ctx.world_size, dtype=uploads[0].dtype, device=device)
                        pending = [PendingGather(C.start_all_gather(self.ctx, out, uploads[0], label=self.label), out)]
                else:  # one rank: a part's upload is its full tensor ([Note: full storage] in unit_buffer.py)
                    uploads = [self._upload(part.local, device, [part.alloc_full()] if self.ctx.world_size == 1 else None)[0]
                               for part in self.parts]
                    pending = [part.start_gather(self.ctx, self.label, shard)
                               for part, shard in zip(self.parts, uploads)]
        self._pending, self._events = pending, events
        if self.host is not None:
            # The device copies live until the gathers are waited for (the collective reads them).
            self._uploads = uploads
            self._host_reads = list(events)  # recorded after the uploads, on the same stream
        self.state = UnitState.GATHERING

    def _upload(self, shard: torch.Tensor, device: torch.device, into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """[Note: host shards] A device copy of the host ``shard`` (a copy even where host and device
        are both the CPU, so the host shard stays the one the optimizer writes), read through the
        host memory's ``stage`` (NVMe: a staging buffer, nvme_staging.py): ``into`` (tensors that take
        its elements one after another) or one new tensor; ``[shard]`` when it lives on the device."""
        if self.host is None:
            return [shard]
        staged = self.host.stage(shard)
        outs = into if into is not None else [torch.empty(shard.numel(), dtype=shard.dtype, device=device)]
        offset = 0
        for out in outs:
            out.copy_(staged[offset : offset + out.numel()], non_blocking=staged.is_pinned())
            offset += out.numel()
        self.host.done_with(staged, device)
        return outs

    def host_shards(self) -> list[torch.Tensor]:
        """The tensors this unit keeps in host memory or swap files (parameter offload), else []."""
        if self.host is None:
            return []
        return [self._fused_local] if self._fused else [part.local for part in self.parts]

    def write_back_shards(self) -> None:
        """Parameter offload to NVMe: the shards were just filled (construction, ``materialize``) or
        edited (``gathered(modifier_rank=...)``): write them to the disk and drop their pages
        ([Note: shards written back] in nvme_params.py)."""
        for shard in self.host_shards():
            self.host.write_back(shard)

    def read_ahead(self) -> None:
        """Parameter offload to NVMe: start reading this unit's shards for its next upload
        ([Note: staging] in nvme_staging.py); nothing otherwise, or while it is gathered."""
        if self.state is UnitState.SHARDED:
            for shard in self.host_shards():
                self.host.read_ahead(shard)

    def settle_host(self) -> None:
        """Before the CPU writes the host shards: wait until no upload still reads them. By the
        optimizer step the device has long done them; nothing to wait for on CPU or without offload."""
        for event in self._host_reads:
            event.synchronize()
        self._host_reads = []

    def wait_unshard(self) -> None:
        """Idempotent: the current stream waits for the gathers; every param points at its slice."""
        if self.state is UnitState.UNSHARDED:
            return
        if self.state is not UnitState.GATHERING or self._pending is None:
            raise AssertionError(f"{self.label}: wait_unshard in state {self.state.name}, expected GATHERING")
        pending, self._pending = self._pending, None
        with record_function("hf_zero::wait_unshard"):
            for gather in pending:
                C.wait(gather.handle)  # on CUDA: orders the current stream after the collective
            self.streams.wait_event(self._events)
        self._uploads = []  # [Note: host shards]: freed after the wait, as the full tensors are
        fulls = [gather.full for gather in pending]
        if self._fused and self.ctx.world_size > 1:  # rank r's block holds every part's shard r: copy each part's shards out
            rows, offset, fulls = pending[0].full.view(self.ctx.world_size, -1), 0, []
            for part in self.parts:  # into its full tensor ([Note: full storage] in unit_buffer.py)
                full = part.alloc_full()
                full.view(self.ctx.world_size, -1).copy_(rows[:, offset : offset + part.local.numel()])
                fulls.append(full)
                offset += part.local.numel()
        for part, full in zip(self.parts, fulls):
            part.attach(full)
        self.state = UnitState.UNSHARDED

    def unshard(self) -> None:
        """Idempotent: the full params, now (waits for a prefetch in flight rather than gathering again)."""
        self.start_unshard()
        self.wait_unshard()

    def reshard(self) -> None:
        """Idempotent: drop the full params, keep the shards. A gather in flight is waited for first:
        its output must not be freed (and reused) while the collective still writes it."""
        if self.state is UnitState.SHARDED or self.single or self.persistent:
            return
        if self.state is UnitState.GATHERING:
            self.wait_unshard()
        for part in self.parts:
            part.detach()
        self.state = UnitState.SHARDED

    def host_bytes(self) -> int:
        """Bytes of this unit's shards in host memory (parameter offload), else 0."""
        return sum(t.numel() * t.element_size() for t in self.host_shards())

    def held_bytes(self) -> int:
        """Device bytes: the full params while gathered (or in flight), the shards unless on the host,
        and the uploaded copies of host shards while their gathers are in flight (at W > 1)."""
        uploads = sum(t.numel() * t.element_size() for t in self._uploads) if self.ctx.world_size > 1 else 0
        if self._pending is not None and self._fused and self.ctx.world_size > 1:  # one all-gather output
            out = self._pending[0].full
            return out.numel() * out.element_size() + sum(part.held_bytes(None, False) for part in self.parts) + uploads
        fulls = [g.full for g in self._pending] if self._pending is not None else [p.buffer.data for p in self.parts]
        return sum(part.held_bytes(full, self.persistent) for part, full in zip(self.parts, fulls)) + uploads


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


def make_units(model: nn.Module, plans: list[UnitPlan], buffers: list[FlatParamBuffer], ctx: C.CommContext,
               streams: Streams, host: HostMemory | None = None) -> list[ParamUnit]:
    """One ParamUnit per plan; ``buffers`` are the trainable buffers of the plans that have trainable
    params, in order. A module ``None`` is a persistent group. ``host``: parameter offload, the
    shards' host memory ([Note: host shards])."""
    trainable = iter(buffers)
    # Parameter offload to NVMe: each unit's shards are written to its swap files here (a bar on rank 0).
    to_disk = host is not None and host.on_disk
    return [ParamUnit(i, plan.module if plan.module is not None else model,
                      next(trainable) if plan.trainable else None, ctx, root=plan.module is model,
                      persistent=plan.module is None, streams=streams, frozen=frozen_buffers(plan.frozen, ctx),
                      host=host)
            for i, plan in enumerate(progress(plans, desc="Writing parameter shards to NVMe", unit="unit",
                                              disable=not to_disk))]


def outside_compile(hook):
    """``hook`` run eagerly by a compiled caller (a graph break around it), never traced ([Note: compiled forward])."""
    return torch.compiler.disable(hook, recursive=True, reason="hf_zero stage-3 unit hook: gathers and drops params")


class Phase(enum.Enum):
    IDLE = "idle"  # outside the model's forward and backward: units are gathered on use, nothing ahead
    FORWARD = "forward"  # inside the model's forward: the unit order is recorded, and prefetched from
    BACKWARD = "backward"  # from the first pre-backward hook to the end of backward


class UnitHooks:
    """When each unit is gathered and dropped: module hooks for forward, grad hooks for backward,
    and the prefetch schedule ([Note: prefetch])."""

    def __init__(self, model: nn.Module, units: list[ParamUnit], *, prefetch_numel: int = 0, max_live_numel: int | None = None) -> None:
        for name, value in (("prefetch_bucket_size", prefetch_numel), ("max_live_parameters", max_live_numel)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0 (elements), got {value!r}")
        self.model = model
        self.units = [u for u in units if not u.persistent]  # the persistent unit is never gathered
        # [Note: frozen release] A unit with frozen params is released only once its backward is
        # over: its trainable grads are all in (``_grads_in``; none to wait for without a trainable
        # part) and the grads of its inputs are computed (``_inputs_in``), since the frozen weights
        # are still read for the input grads after the last trainable grad may have arrived. A unit
        # whose inputs need no grad is released at the end of backward.
        self._grads_in: set[ParamUnit] = set()
        self._inputs_in: set[ParamUnit] = set()
        self.prefetch_numel, self.max_live_numel = prefetch_numel, max_live_numel
        self.phase = Phase.IDLE
        self._order: list[ParamUnit] = []  # units in the order the last forward first used them
        self._seen: dict[ParamUnit, None] = {}  # units first used in this pass, in order
        self._current: ParamUnit | None = None  # backward: the unit whose backward started last
        self._prefetched: dict[ParamUnit, None] = {}  # gathered ahead, not used yet
        self.peak_live_numel = 0  # most full elements (gathered or in flight) at once; for tests
        # Parameter offload: where the units' shards live (one memory for all of them; read ahead from it).
        self._hosts = list({id(u.host): u.host for u in self.units if u.host is not None}.values())

    def install(self) -> list:
        # Registered first, so they run before the root unit's hooks on the same module.
        handles = [self.model.register_forward_pre_hook(outside_compile(self._model_pre_forward)),
                   self.model.register_forward_hook(outside_compile(self._model_post_forward))]
        for unit in self.units:
            handles.append(unit.module.register_forward_pre_hook(outside_compile(self._pre_forward(unit))))
            handles.append(unit.module.register_forward_hook(outside_compile(self._post_forward(unit))))
            if unit.root:
                # Root params are also used outside the model's own forward (generate() runs the
                # encoder alone, then the decoder): the modules that own them gather on use too.
                owned = {id(p) for p in unit.params()}
                for module in self.model.modules():
                    if module is not self.model and any(id(p) in owned for p in module.parameters(recurse=False)):
                        handles.append(module.register_forward_pre_hook(outside_compile(self._pre_forward(unit))))
        return handles

    def on_grads_done(self, unit: ParamUnit) -> None:
        """Every gradient of ``unit``'s trainable part is in: its full params can go."""
        if unit.persistent:
            return
        self._grads_in.add(unit)
        if not unit.frozen or unit in self._inputs_in:
            self._release(unit)

    def _release(self, unit: ParamUnit) -> None:
        unit.backward_pending = False
        self._prefetched.pop(unit, None)
        unit.reshard()

    def on_backward_end(self) -> None:
        self._release_prefetched()
        for unit in self.units:
            unit.backward_pending = False
            unit.reshard()
        self.phase, self._seen, self._current = Phase.IDLE, {}, None
        self._grads_in, self._inputs_in = set(), set()

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

    def _read_ahead(self, order: list[ParamUnit], after: ParamUnit | None) -> None:
        """Parameter offload to NVMe: the next unit after ``after`` in ``order`` (None: from the start)
        that is neither used in this pass nor gathered starts reading its shards from disk
        ([Note: staging] in nvme_staging.py), one unit ahead of the gathers."""
        if not self._hosts:
            return
        if after is not None:
            if after not in order:
                return
            order = order[order.index(after) + 1 :]
        for unit in order:
            if unit not in self._seen and unit.state is UnitState.SHARDED:
                unit.read_ahead()
                return

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
        for host in self._hosts:  # reads ahead end with the pass: [Note: staged versions]
            host.drop_read_ahead()

    # ---- module and grad hooks ----------------------------------------------------------------

    def _pre_forward(self, unit: ParamUnit):
        def pre_forward(module, args):
            first = self.phase is Phase.FORWARD and unit not in self._seen
            if first:
                self._seen[unit] = None
            self._use(unit)
            if first:
                self._prefetch(self._order, after=unit)
                self._read_ahead(self._order, after=unit)
            if unit.frozen and not unit.root and torch.is_grad_enabled():
                inputs = output_tensors(args)
                if inputs:  # [Note: frozen release]
                    torch.autograd.graph.register_multi_grad_hook(inputs, self._inputs_grad_done(unit), mode="all")
        return pre_forward

    def _inputs_grad_done(self, unit: ParamUnit):
        def inputs_grad_done(_grads):
            self._inputs_in.add(unit)
            if unit.bucket is None or unit in self._grads_in:
                self._release(unit)
        return inputs_grad_done

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
                self._read_ahead(self._order[::-1], after=None if unit.root else unit)
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
