"""``ZeroEngine``: ZeRO stages 1, 2 and 3 around an existing model and torch optimizer.

Construction (see [Note: vocabulary] in ``__init__``):
1. trainable full params are packed into one ``FlatParamBuffer`` per (dtype, device);
2. each bucket gets an fp32 main grad shard and, with the optimizer, an fp32 master shard (a
   view of the buffer when the model is fp32) (pieces.py);
3. the optimizer's param groups are rewritten in place to hold one piece per full param that
   meets the local shard (so weight decay groups and every per-group setting survive), each
   piece's ``.grad`` a view of the main grad shard (pieces.py);
4. a post-accumulate-grad hook on every full param moves its gradient into its bucket's staging
   tensor; optimizer step pre/post hooks finish the reduction and all-gather the new params.

The optimizer object stays the user's: ``trainer.optimizer`` and LR schedulers keep working;
its state is the local shard's state. The optimizer may also come later (``attach_optimizer``):
a model sharded as it loads (hf_zero/init) has an engine before the Trainer builds its optimizer,
so that it can evaluate and generate before training.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.nn.utils import get_total_norm
from torch.profiler import record_function
from torch.utils.hooks import RemovableHandle

from hf_zero.engine import accounting, full_params, pieces, step_overlap
from hf_zero.engine import collectives as C
from hf_zero.engine.grad_sync import BucketState, GradBucket, GradSync
from hf_zero.engine.labels import labelled
from hf_zero.engine.layout import FlatParamBuffer
from hf_zero.engine.materialize import materialize_units
from hf_zero.engine.offload import OptimizerOffload, ParamOffload
from hf_zero.engine.ranges import Range
from hf_zero.engine.shard_map import ParamShard, shard_map
from hf_zero.engine.stages import strategy_for
from hf_zero.engine.streams import Streams
from hf_zero.engine.tiers import param_memory
from hf_zero.engine.unit_plan import plan_units
from hf_zero.engine.units import ParamUnit, UnitHooks, make_units


class ZeroEngine:
    """Shards optimizer state (stage 1), gradients (stage 2) and params (stage 3) of ``model``."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        stage: int,
        bucket_numel: int,
        param_dtype: torch.dtype | None = None,
        offload: OptimizerOffload | None = None,
        offload_param: ParamOffload | None = None,
        prefetch_numel: int = 0,
        max_live_numel: int | None = None,
        persistence_threshold: int = 0,
        group=None,
        source=None,
    ) -> None:
        self.strategy = strategy_for(stage)
        self.model, self.optimizer = model, optimizer
        self.bucket_numel = bucket_numel
        # Stage 3 (units.py): elements gathered ahead of use (0: none), most full elements at once
        # (None: no bound), and params below this many elements kept whole (0: none).
        self.prefetch_numel, self.max_live_numel = prefetch_numel, max_live_numel
        self.persistence_threshold = persistence_threshold
        # bf16/fp16 runs keep the model's trainable params in that dtype and an fp32 master shard.
        self.param_dtype = param_dtype
        self.offload = offload  # None: the optimizer runs on the params' device (offload.py)
        # Stage 3: the units' param shards in host memory between uses ([Note: host shards] in units.py).
        self.offload_param = offload_param
        if offload_param is not None and not self.strategy.shard_params:
            raise ValueError(f"parameter offload (offload_param.device = {offload_param.device!r}) needs ZeRO stage 3, "
                             f"got stage {stage}")
        self.ctx = C.CommContext(group)
        self._param_memory = param_memory(offload_param, model, self.ctx) if offload_param is not None else None
        if optimizer is not None:
            pieces.check_optimizer(optimizer)
        # Stage 3 only: a ``materialize.ParamSource`` fills the local shards of a model whose params
        # are on the meta device (hf_zero/init), so no rank ever holds the full model.
        self._source = source
        if source is not None and not self.strategy.shard_params:
            raise ValueError("a model loaded sharded (hf_zero.init) needs ZeRO stage 3")

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names = {p: n for n, p in named}
        device = source.device if source is not None else named[0][1].device if named else torch.device("cpu")
        self.streams = Streams.for_device(device)
        # The optimizer's groups as the user built them, in full params; rewritten into pieces.
        self._groups_full = [list(g["params"]) for g in optimizer.param_groups] if optimizer is not None else None
        self._step_in_backward = (False, False)  # set_step_in_backward: (early, overlap_forward)
        # [Note: step in backward] in host_step.py, overlap_forward (step_overlap.py).
        self._gates = step_overlap.ForwardGates(lambda: self._host_step)
        self._hidden = step_overlap.HiddenPieces()
        self._build(named)
        # Until the first backward has shown the order in which gradients arrive, the layout
        # follows registration order; see _on_backward_end. One rank has nothing to overlap.
        relayout = self.ctx.world_size > 1 and not self.strategy.shard_params  # stage 3: unit order
        self._arrival: list[nn.Parameter] | None = [] if relayout else None

        self._in_backward = False
        self._boundary = True  # this backward ends gradient accumulation (set_gradient_sync)
        self._boundary_source = None  # or a callable saying so (the Trainer's sync_gradients)
        self._used: set[nn.Parameter] = set()  # params that got a gradient in this step, this rank
        self._unused: set[nn.Parameter] | None = None  # no gradient on any rank (finish_grad_sync)
        self._grad_hooks: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(self._on_grad) for p in self._where
        ]
        self._hooks: list[RemovableHandle] = []
        if self.units:
            self._unit_hooks = UnitHooks(self.model, self.units, list(zip(self.grad_sync.buckets, self._bucket_units)),
                                         prefetch_numel=self.prefetch_numel, max_live_numel=self.max_live_numel)
            self._hooks.extend(self._unit_hooks.install())
        if optimizer is not None:
            self._hook_optimizer()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Take the optimizer of an engine built without one: its groups are rewritten into pieces."""
        if self.optimizer is not None:
            raise ValueError("this ZeroEngine has an optimizer already")
        pieces.check_optimizer(optimizer)
        self.optimizer = optimizer
        self._groups_full = [list(g["params"]) for g in optimizer.param_groups]
        pieces.build_masters(self)
        self._hook_optimizer()

    def _hook_optimizer(self) -> None:
        self._hooks.append(self.optimizer.register_step_pre_hook(lambda *_: self._before_step()))
        self._hooks.append(self.optimizer.register_step_post_hook(lambda *_: self._after_step()))
        if self.offload is not None:  # [Note: step in backward]: forward gates, idle unless overlap_forward
            self._hooks.extend(self._gates.install(self.model, set(self._names)))

    # ---- layout -------------------------------------------------------------------------------

    def _build(self, named: list[tuple[str, nn.Parameter]], old: "GradSync | None" = None) -> None:
        """Pack ``named`` (forward order) into buffers, build buckets, masters and pieces, and point
        the optimizer at the pieces. With ``old``, carry its un-reduced staging gradients over."""
        by_kind: dict[tuple, list] = defaultdict(list)
        for name, param in named:
            by_kind[(param.dtype, param.device)].append((name, param))
        old_grads = {}
        if old is not None:
            for gb in old.buckets:
                if gb.staging is not None:
                    for i in gb.bucket.slots:
                        r = gb.buffer.slots[i].range.shift(gb.bucket.range.start)
                        old_grads[gb.buffer.params[i]] = gb.staging[r.start : r.end]
        groups = self._unit_params(named) if self.strategy.shard_params else list(by_kind.values())
        bucket_numel = 2**62 if self.strategy.shard_params else self.bucket_numel  # stage 3: one per unit
        self.buffers = [
            FlatParamBuffer(ps, world_size=self.ctx.world_size, rank=self.ctx.rank,
                            bucket_numel=bucket_numel, dtype=self.param_dtype)
            for ps in groups
        ]
        self.units: list[ParamUnit] = []
        self._bucket_units: list[ParamUnit] = []  # stage 3: the unit of each grad bucket (one each)
        if self.strategy.shard_params:
            if old is not None:
                raise AssertionError("stage 3 units are built once: their frozen params are sharded already")
            self.units = make_units(self.model, self._unit_plans, self.buffers, self.ctx, self.streams,
                                    host=self._param_memory)
            if self._source is not None:
                materialize_units(self.units, self._source)
            self._bucket_units = [u for u in self.units if u.buffer is not None]
        grad_buckets = [GradBucket(buf, b, self.ctx.world_size) for buf in self.buffers for b in buf.buckets]
        sync_enabled = old.sync_enabled if old is not None else True
        self.grad_sync = GradSync(self.ctx, grad_buckets)
        self.grad_sync.sync_enabled = sync_enabled

        # Side tables (no attributes on parameters): full param -> (bucket runtime, slot index).
        self._where: dict[nn.Parameter, tuple[GradBucket, int]] = {}
        for gb in grad_buckets:
            for slot_index in gb.bucket.slots:
                param = gb.buffer.params[slot_index]
                self._where[param] = (gb, slot_index)
                if param in old_grads:
                    gb.carry_grad(slot_index, old_grads[param])

        self._bucket_index = {id(gb): i for i, gb in enumerate(grad_buckets)}
        self._grads_on_host = False
        # Masters, optimizer pieces and the host step come with the optimizer: a model sharded as it
        # loads (hf_zero/init) holds only its param shards until the Trainer creates one.
        self.masters: list[torch.Tensor] = []  # one fp32 master shard per grad bucket
        self._pieces: dict[nn.Parameter, nn.Parameter] = {}
        self._piece_grads: list[tuple[nn.Parameter, GradBucket, Range, nn.Parameter]] = []
        self._offloaded = [False] * len(grad_buckets)
        if getattr(self, "_host_step", None) is not None:
            self._host_step.close()  # a re-layout: the old swap files go before the new ones are sized
        self._host_step = None
        if self.optimizer is not None:
            pieces.build_masters(self)

    # ---- stage 3 units ------------------------------------------------------------------------

    def _unit_params(self, named: list[tuple[str, nn.Parameter]]) -> list[list[tuple[str, nn.Parameter]]]:
        """The trainable groups of the stage-3 units; frozen params are planned into the units too
        (unit_buffer.py), so that the frozen base of a LoRA fine-tune is sharded as well."""
        frozen = [(n, p) for n, p in self.model.named_parameters() if not p.requires_grad]
        self._unit_plans = plan_units(self.model, named, frozen, self.persistence_threshold, self.param_dtype)
        return [plan.trainable for plan in self._unit_plans if plan.trainable]

    def gathered(self, modifier_rank: int | None = None, *, params=None):
        """Context manager: inside, every param (or those in ``params``) holds its full value; with
        ``modifier_rank`` that rank's edits are kept (full_params.py). Call it on every rank (it
        communicates)."""
        self.settle()
        return full_params.gathered(self, modifier_rank, params)

    def full_state_dict(self, *, to_cpu_on: int | None = 0) -> dict[str, torch.Tensor] | None:
        """The model's state dict with full values, gathered unit by unit (full_params.py)."""
        self.settle()
        return full_params.full_state_dict(self, to_cpu_on=to_cpu_on)

    # ---- gradient path ----------------------------------------------------------------------

    def _on_grad(self, param: nn.Parameter) -> None:
        if not self._in_backward:
            self.settle()  # the last step's host work: its grads are overwritten now
            self._in_backward = True
            self.grad_sync.begin_backward()
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        self._used.add(param)
        if self._arrival is not None:
            self._arrival.append(param)
        bucket, slot_index = self._where[param]
        if bucket.state in (BucketState.REDUCING, BucketState.REDUCED):
            raise AssertionError(
                f"parameter {bucket.buffer.slots[slot_index].name} received a second gradient in one backward "
                "after its bucket was reduced (reentrant gradient checkpointing with shared weights?)"
            )
        bucket.add_grad(slot_index, param.grad)
        param.grad = None
        if self.units and bucket.state is BucketState.READY:
            self._unit_hooks.on_grads_done(bucket)
        if self._arrival is None:  # the first backward only stages: its layout is provisional
            self.grad_sync.on_bucket_progress()

    def _on_backward_end(self) -> None:
        self._in_backward = False
        if self.units:
            self._unit_hooks.on_backward_end()
        if self._arrival is not None:
            self._relayout_by_arrival()
        self.grad_sync.on_backward_end()
        if self._host_step is not None and self._host_step.early and self._at_boundary():
            self.grad_sync.finish()  # the last buckets go down (and their chunks to the worker) now

    def _relayout_by_arrival(self) -> None:
        """After the first backward: re-pack buffers so buckets follow gradient arrival order.

        Buckets launch strictly in index order, so a bucket holding one late gradient (say a
        layer's input norm, registered after its attention) would hold back every later bucket.
        As DDP does after its first iteration, the layout is rebuilt once from the observed
        order; the optimizer has not stepped yet, and the staged gradients are carried over.
        """
        params = list(self._names)
        index = {p: i for i, p in enumerate(params)}
        arrived = [index[p] for p in dict.fromkeys(self._arrival)]
        self._arrival = None
        if self.ctx.world_size > 1:  # every rank must build the same buckets: rank 0's order wins
            box = [arrived]
            torch.distributed.broadcast_object_list(box, src=0, group=self.ctx.group)
            arrived = box[0]
        seen = set(arrived)
        rest = [i for i in range(len(params)) if i not in seen]
        order = [params[i] for i in reversed(arrived)] + [params[i] for i in rest]  # packed in reverse
        current = [p for buf in self.buffers for p in reversed(buf.params)]
        if [id(p) for p in order] == [id(p) for p in current]:
            return
        # Same Parameter objects: their grad hooks stay, and _on_grad reads the new side tables.
        self._build([(self._names[p], p) for p in order], old=self.grad_sync)

    def set_gradient_sync(self, enabled: bool) -> None:
        """False between gradient-accumulation boundaries; only stage 1 then skips communication."""
        self._boundary = enabled
        self.grad_sync.sync_enabled = enabled or self.strategy.reduce_every_microstep

    def set_boundary_source(self, source) -> None:
        """``source()`` is True in the backward that ends a gradient accumulation (the Trainer's
        ``accelerator.sync_gradients``). Without one, a backward outside ``no_sync()`` counts."""
        self._boundary_source = source

    def finish_grad_sync(self) -> None:
        """Idempotent: all reductions of this step done, and the optimizer's pieces see them.

        As under DDP, a param that got no gradient on any rank in this step keeps ``grad = None``,
        so the optimizer leaves it alone (no weight decay, no moment decay)."""
        if self._grads_on_host:
            return  # done for this step; the device main grads of offloaded buckets are gone
        self.grad_sync.finish()
        if self._unused is None:
            self._unused = self._globally_unused()
        self._point_pieces_at(self._grad_shards())

    def _point_pieces_at(self, shards: list[torch.Tensor]) -> None:
        """Each piece's grad: its slice of the bucket's grad shard. Offloaded pieces are left
        alone: the host step sets theirs as it steps them (maybe on its worker, right now)."""
        for piece, gb, local, param in self._piece_grads:
            i = self._bucket_index[id(gb)]
            if self._offloaded[i]:
                continue
            if param in self._unused:
                piece.grad = None
            else:
                piece.grad = shards[i][local.start : local.end]

    @labelled("hf_zero::before_step")
    def _before_step(self) -> None:
        """The optimizer step's pre-hook: reductions done; offloaded buckets stepped on the host.

        The host step (host_step.py) moves the clipped grads of offloaded buckets down, steps
        them chunk by chunk with the user's optimizer class and uploads the new params (or, with
        parameter offload, writes them into the host shards), or waits for the worker that did so
        during backward ([Note: step in backward]); the user's own step then only updates the
        device buckets."""
        self.finish_grad_sync()
        if self._host_step is None or self._grads_on_host:
            return
        self._flush_offloaded()
        self._grads_on_host = True
        on_device = [piece for piece, gb, _, _ in self._piece_grads if not self._offloaded[self._bucket_index[id(gb)]]]
        # Device buckets first (ratio < 1): their kernels are queued at once and run on the GPU
        # while the host steps the rest.
        self._host_step.run(self.optimizer, on_device, self._unused)
        for piece in on_device:
            piece.grad = None  # stepped already: the user's own step has nothing left to do
        if self._host_step.pending:  # overlap_forward: the worker may be stepping offloaded pieces
            self._hidden.hide(self.optimizer, on_device)  # until _after_step

    def _param_shard(self, i: int) -> torch.Tensor:
        """Bucket ``i``'s local param shard (stage 3: its unit's, maybe a host shard)."""
        gb = self.grad_sync.buckets[i]
        return self._bucket_units[i].local if self.units else gb.buffer.view(gb.bucket.shard)

    def _settle_param_shard(self, i: int) -> None:
        """Before the host step writes bucket ``i``'s host param shard: no upload reads it any more."""
        if self.units:
            self._bucket_units[i].settle_host()

    def _flush_offloaded(self) -> None:
        """Send down what backward did not: every offloaded bucket's grad is then wholly on the host."""
        for gb in self.grad_sync.buckets:
            if gb.main_grad is not None:
                self._on_reduced(gb, boundary=True)

    def _on_reduced(self, gb: GradBucket, boundary: bool | None = None) -> None:
        """An offloaded bucket's reduction has landed: at the last micro-step of an accumulation
        its main grad goes to the host now, while backward goes on, and leaves the device."""
        i = self._bucket_index[id(gb)]
        if boundary is None:
            boundary = self._at_boundary()
            # Once a bucket was reduced again after it went down (a loop that accumulates without
            # telling us), grads wait on the device until the step: one host copy each, no extras.
            boundary = boundary and not self._host_step.accumulating
        if not self._offloaded[i] or not boundary:
            return
        self._host_step.download(i, gb.main_grad)
        gb.main_grad, gb.main_on_host = None, True
        if self._host_step.early:
            params = [gb.buffer.params[s] for s in gb.bucket.slots]
            self._host_step.ready(i, step_overlap.used_flags(self.ctx, params, self._used, gb.buffer.device,
                                                             f"used-param flags of bucket {i}"))

    def _at_boundary(self) -> bool:
        """Whether the current backward ends a gradient accumulation."""
        return self._boundary_source() if self._boundary_source is not None else self._boundary

    def set_step_in_backward(self, enabled: bool, *, overlap_forward: bool = False) -> None:
        """Let the host step of offloaded buckets run during backward ([Note: step in backward] in
        host_step.py): only for runs that never clip (the Trainer: ``max_grad_norm`` 0), since the
        global norm is known only after backward. ``overlap_forward``: and let ``optimizer.step()``
        return before the host is done, the next forward waiting for each bucket's new params as
        it needs them; between the step and the next backward, read the params through the
        engine (``gathered``, state dicts, the Trainer's saves) or call ``settle()`` first.
        Nothing changes without optimizer offload."""
        self._step_in_backward = (enabled, enabled and overlap_forward)
        if self._host_step is not None:
            self._host_step.settle()
            self._host_step.early, self._host_step.defer = self._step_in_backward

    def settle(self) -> None:
        """Every offloaded bucket's optimizer step is done and its params are in place (the
        current stream waits for their uploads): a no-op unless ``set_step_in_backward(True,
        overlap_forward=True)`` left the host step running past ``optimizer.step()``."""
        self._hidden.show()  # (a user step that raised never reached _after_step)
        if self._host_step is not None:
            self._host_step.settle()

    def _grad_shards(self) -> list[torch.Tensor]:
        """Each bucket's reduced grad shard this step, where it is now (device, or host if offloaded)."""
        return [self._host_step.host_grads[i] if self._grads_on_host and self._offloaded[i] else gb.main_grad
                for i, gb in enumerate(self.grad_sync.buckets)]

    def _globally_unused(self) -> set:
        params = list(self._names)
        used = torch.tensor([p in self._used for p in params], dtype=torch.int32, device=self.buffers[0].device)
        C.wait(C.start_all_reduce(self.ctx, used, label="used-param flags"))  # one tiny all-reduce per step
        return {p for p, u in zip(params, used.tolist()) if u == 0}

    # ---- clipping ---------------------------------------------------------------------------

    @labelled("hf_zero::grad_norm")
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the reduced gradients, as ``clip_grad_norm_`` of plain DDP reports it."""
        self.finish_grad_sync()
        shards, device = self._grad_shards(), self.buffers[0].device
        if self._host_step is None:
            local = get_total_norm(shards).pow(2).to(device)
        else:  # the same value: get_total_norm is the norm of the per-tensor norms, in order
            if not self._grads_on_host:
                self._flush_offloaded()
                shards = self._grad_shards()
            norms = [self._host_step.norm(i) if self._on_host(i) else get_total_norm([g]).to(device)
                     for i, g in enumerate(shards)]
            local = torch.linalg.vector_norm(torch.stack(norms), 2).pow(2)
        return C.wait(C.start_all_reduce(self.ctx, local, label="grad norm")).sqrt()

    def _on_host(self, i: int) -> bool:
        return self._offloaded[i] and self._host_step.downloaded(i)

    @labelled("hf_zero::clip_grad_norm")
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the main grads so their global norm is at most ``max_norm``; return the norm before."""
        if self._host_step is not None and self._host_step.early and max_norm != float("inf"):
            raise RuntimeError(
                f"clip_grad_norm_({max_norm}): the optimizer step of offloaded buckets ran during backward "
                "(ZeroEngine.set_step_in_backward(True), which the Trainer sets when max_grad_norm is 0), so "
                "their gradients can no longer be clipped; set_step_in_backward(False) to clip")
        total = self.grad_norm()
        if max_norm != float("inf"):
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch's clip_grad_norm_
            shards = self._grad_shards()
            on_device = [g for i, g in enumerate(shards) if self._host_step is None or not self._on_host(i)]
            for grads in _by_device(on_device):
                torch._foreach_mul_(grads, coef.to(grads[0].device))
            if self._host_step is not None:
                self._host_step.scale = coef  # the host grads are scaled as the host step reads them
        return total

    # ---- after the optimizer step -----------------------------------------------------------

    @labelled("hf_zero::after_step")
    def _after_step(self) -> None:
        self._hidden.show()
        handles = []
        for unit in self._bucket_units:
            unit.settle_host()  # parameter offload: the shards below may be host shards
        with torch.no_grad():
            if self._host_step is not None:
                self._host_step.wait_uploads()  # offloaded buckets: uploaded by the host step
            for i, (gb, master) in enumerate(zip(self.grad_sync.buckets, self.masters)):
                shard = self._bucket_units[i].local if self.units else gb.buffer.view(gb.bucket.shard)
                if self._offloaded[i]:
                    if not self._grads_on_host:  # not stepped this time (a resume): upload now
                        shard.copy_(master.to(shard.device, non_blocking=True))
                elif master.data_ptr() != shard.data_ptr():
                    shard.copy_(master)
                if not self.units or self._bucket_units[i].persistent:  # other stage-3 units: at their next use
                    if self._offloaded[i] and self.ctx.world_size > 1:  # (one rank gathers nothing)
                        self._host_step.wait_chunk_of(i)  # overlap_forward: this bucket's step may still run
                    with record_function("hf_zero::start_param_all_gather"):
                        handles.append(C.start_all_gather(self.ctx, gb.buffer.view(gb.bucket.range), shard,
                                                          label=f"params of bucket {i}"))
        for h in handles:
            with record_function("hf_zero::wait_param_all_gather"):
                C.wait(h)
        self.zero_grad()

    def zero_grad(self) -> None:
        """Idempotent: forget this step's gradients (consumed by the step, or the step was skipped)."""
        for bucket in self.grad_sync.buckets:
            bucket.finish_reduce()  # no collective may be left in flight
        for piece, gb, _, _ in self._piece_grads:
            if not self._offloaded[self._bucket_index[id(gb)]]:  # offloaded: the host step's own
                piece.grad = None  # let the main grads go until the next backward
        self._grads_on_host = False
        if self._host_step is not None:
            self._host_step.end_step()
        self._used, self._unused = set(), None
        self.grad_sync.start_next_step()

    # ---- checkpoint state ---------------------------------------------------------------------

    def layout(self) -> list[str]:
        """Trainable param names in packing order (forward order per buffer): defines the pieces."""
        return [buf.slots[i].name for buf in self.buffers for i in reversed(range(len(buf.params)))]

    def shard_map(self) -> list[ParamShard]:
        """Per trainable param: its full shape and which flat ranges each rank holds (shard_map.py)."""
        return shard_map(self)

    def adopt_layout(self, names: list[str]) -> None:
        """Re-pack the buffers in a saved layout's order, before the optimizer has any state (resume)."""
        if self.optimizer is not None and self.optimizer.state:
            raise AssertionError("adopt_layout needs an optimizer without state")
        by_name = {n: p for p, n in self._names.items()}
        if sorted(names) != sorted(by_name):
            raise AssertionError("adopt_layout got another set of params")
        self._arrival = None  # the saved order already is the arrival order
        if names == self.layout():
            return
        if self.units:
            raise AssertionError("stage 3 units are laid out by module order, never re-packed")
        self._build([(n, by_name[n]) for n in names])  # same params: the grad hooks stay

    def sync_params_from_masters(self) -> None:
        """Copy the fp32 masters into the params, as after an optimizer step (after a resume)."""
        self.settle()
        self._after_step()

    # ---- accounting -------------------------------------------------------------------------

    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds right now, measured from the tensors themselves (accounting.py)."""
        return accounting.held_bytes(self)

    def reset_peak(self) -> None:
        """Start a new window for ``held_bytes()["peak_grads"]``."""
        self.grad_sync.peak_grad_bytes = 0

    def close(self) -> None:
        self.settle()
        if self._host_step is not None:
            self._host_step.close()  # NVMe offload: this rank's swap files are deleted
        if self._param_memory is not None:
            self._param_memory.close()  # parameter offload to NVMe: its swap files too
        for h in self._hooks + self._grad_hooks:
            h.remove()
        self._hooks.clear()
        self._grad_hooks.clear()


def _by_device(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[t.device].append(t)
    return list(groups.values())
