"""``ZeroEngine``: ZeRO stages 1, 2 and 3 around an existing model and torch optimizer.

Construction (see [Note: vocabulary] in ``__init__``):
1. the stage's strategy (stages.py) packs the trainable full params into flat buffers (stages
   1-2: one per (dtype, device); stage 3: one per unit) and one ``ShardedBucket`` per reduce
   bucket (sharded_bucket.py), which holds everything this rank keeps for it;
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

from hf_zero.engine import collectives as C
from hf_zero.engine import clip_in_step, full_params, pieces
from hf_zero.engine.diagnostics import accounting
from hf_zero.engine.grad_sync import BucketState, GradSync
from hf_zero.engine.offload import auto_ratio, step_overlap
from hf_zero.engine.offload.host_step import HostStep
from hf_zero.engine.diagnostics.labels import labelled
from hf_zero.engine.offload.settings import OptimizerOffload, ParamOffload
from hf_zero.engine.offload.speculation import SpeculationPolicy
from hf_zero.engine.shard_map import ParamShard, shard_map
from hf_zero.engine.sharded_bucket import ShardedBucket
from hf_zero.engine.strategies import make_strategy
from hf_zero.engine.streams import Streams
from hf_zero.engine.stage3.units import ParamUnit


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
        self.model, self.optimizer = model, optimizer
        # bf16/fp16 runs keep the model's trainable params in that dtype and an fp32 master shard.
        self.param_dtype = param_dtype
        self.offload = offload  # None: the optimizer runs on the params' device (offload.py)
        # The stage-3 options as given (the strategy uses them; hf_zero/init compares them with the
        # Trainer's config when an engine built at load time meets the Trainer).
        self.offload_param, self.prefetch_numel = offload_param, prefetch_numel
        self.max_live_numel, self.persistence_threshold = max_live_numel, persistence_threshold
        self.ctx = C.CommContext(group)
        if optimizer is not None:
            pieces.check_optimizer(optimizer)

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names = {p: n for n, p in named}
        # Stage 3 with ``source`` (a ``materialize.ParamSource``): a model on the meta device
        # (hf_zero/init) whose local shards are filled as they are made, so no rank ever holds it whole.
        device = source.device if source is not None else named[0][1].device if named else torch.device("cpu")
        self.streams = Streams.for_device(device)
        # Everything that differs between stages (stages.py): layout, hooks, units. Stage 3: elements
        # gathered ahead of use (0: none), most full elements at once (None: no bound), params below
        # the threshold kept whole (0: none), and parameter offload ([Note: host shards] in units.py).
        self.strategy = make_strategy(stage, model=model, ctx=self.ctx, streams=self.streams,
                                      bucket_numel=bucket_numel, param_dtype=param_dtype,
                                      persistence_threshold=persistence_threshold, prefetch_numel=prefetch_numel,
                                      max_live_numel=max_live_numel, offload_param=offload_param, source=source)
        # The optimizer's groups as the user built them, in full params; rewritten into pieces.
        self._groups_full = [list(g["params"]) for g in optimizer.param_groups] if optimizer is not None else None
        # set_step_in_backward: (early, overlap_forward, speculation policy or None)
        self._step_in_backward: tuple[bool, bool, SpeculationPolicy | None] = (False, False, None)
        # [Note: step in backward] in host_step.py, overlap_forward (step_overlap.py).
        self._gates = step_overlap.ForwardGates(lambda: self._host_step)
        self._hidden = step_overlap.HiddenPieces()
        self.auto_ratio: auto_ratio.AutoRatio | None = None  # what ratio "auto" chose ([Note: auto ratio])
        self._host_step: HostStep | None = None
        # [Note: clip in the step]: (the coefficient, the grad_scale set) the optimizer holds (None: none)
        self._clip_in_step: tuple[torch.Tensor, torch.Tensor] | None = None
        self._build(named)
        # Until the first backward has shown the order in which gradients arrive, the layout
        # follows registration order; see _on_backward_end.
        self._arrival: list[nn.Parameter] | None = [] if self.strategy.tracks_arrival(self.ctx.world_size) else None

        self.closed = False  # close() was called: hooks removed, offload files deleted
        self._in_backward = False
        self._boundary = True  # this backward ends gradient accumulation (set_gradient_sync)
        self._boundary_source = None  # or a callable saying so (the Trainer's sync_gradients)
        self._used: set[nn.Parameter] = set()  # params that got a gradient in this step, this rank
        self._unused: set[nn.Parameter] | None = None  # no gradient on any rank (finish_grad_sync)
        self._grad_hooks: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(self._on_grad) for p in self._where
        ]
        self._hooks: list[RemovableHandle] = list(self.strategy.install())
        if optimizer is not None:
            self._hook_optimizer()

    @property
    def units(self) -> list[ParamUnit]:
        """Stage 3: the units, in backward order (empty at stages 1-2)."""
        return self.strategy.units

    def laid_out_params(self) -> set[nn.Parameter]:
        """Every param this engine lays out: the trainable ones, and at stage 3 the frozen ones its units hold."""
        return set(self._where) | {p for unit in self.units for part in unit.parts for p in part.params}

    @property
    def masters(self) -> list[torch.Tensor]:
        """Each bucket's fp32 master shard (none before the optimizer comes)."""
        return [b.master for b in self.buckets if b.master is not None]

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Take the optimizer of an engine built without one: its groups are rewritten into pieces."""
        if self.optimizer is not None:
            raise ValueError("this ZeroEngine has an optimizer already")
        pieces.check_optimizer(optimizer)
        self.optimizer = optimizer
        self._groups_full = [list(g["params"]) for g in optimizer.param_groups]
        self._host_step = pieces.build_masters(self)
        self._hook_optimizer()

    def _hook_optimizer(self) -> None:
        self._hooks.append(self.optimizer.register_step_pre_hook(lambda *_: self._before_step()))
        self._hooks.append(self.optimizer.register_step_post_hook(lambda *_: self._after_step()))
        if self.offload is not None:  # [Note: step in backward]: forward gates, idle unless overlap_forward
            self._hooks.extend(self._gates.install(self.model, set(self._names)))

    # ---- layout -------------------------------------------------------------------------------

    def _build(self, named: list[tuple[str, nn.Parameter]], old: "GradSync | None" = None) -> None:
        """Pack ``named`` (forward order) into buffers and ``ShardedBucket``s (the strategy), build
        masters and pieces, and point the optimizer at them. With ``old``, carry its un-reduced
        staging gradients over."""
        old_grads = _staged_grads(old) if old is not None else {}
        self.buffers, self.buckets = self.strategy.build(named, first=old is None)
        self.grad_sync = GradSync(self.ctx, [b.grad for b in self.buckets])
        self.grad_sync.sync_enabled = old.sync_enabled if old is not None else True

        # Side table (no attributes on parameters): full param -> (its bucket, slot index).
        self._where: dict[nn.Parameter, tuple[ShardedBucket, int]] = {}
        for b in self.buckets:
            for slot_index in b.grad.bucket.slots:
                param = b.buffer.params[slot_index]
                self._where[param] = (b, slot_index)
                if param in old_grads:
                    b.grad.carry_grad(slot_index, old_grads[param])
        self._grads_on_host = False
        # Masters, optimizer pieces and the host step come with the optimizer: a model sharded as it
        # loads (hf_zero/init) holds only its param shards until the Trainer creates one.
        replacing = self._host_step is not None
        if replacing:
            self._host_step.close()  # a re-layout: the old swap files go before the new ones are sized
        self._host_step = None
        if self.optimizer is not None:
            self._host_step = pieces.build_masters(self, replacing=replacing)

    # ---- full params --------------------------------------------------------------------------

    def gathered(self, modifier_rank: int | None = None, *, params=None):
        """Context manager: inside, every param (or those in ``params``) holds its full value; with
        ``modifier_rank`` that rank's edits are kept (full_params.py). Call it on every rank (it
        communicates). Between backward and the optimizer step with the host step in backward, the
        params read are those of an unfinished step, and edits are refused ([Note: settle mid-step]
        in host_step.py)."""
        if modifier_rank is not None and self._host_step is not None and self._host_step.mid_step:
            raise RuntimeError(
                "gathered(modifier_rank=...) between backward and optimizer.step(): the optimizer step of offloaded "
                "buckets is under way (ZeroEngine.set_step_in_backward), some of their masters stepped already, so "
                "edits could not be kept consistently; edit the params before backward or after the step")
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
        owner, slot_index = self._where[param]
        bucket = owner.grad
        if bucket.state in (BucketState.REDUCING, BucketState.REDUCED):
            raise AssertionError(
                f"parameter {bucket.buffer.slots[slot_index].name} received a second gradient in one backward "
                "after its bucket was reduced (reentrant gradient checkpointing with shared weights?)"
            )
        bucket.add_grad(slot_index, param.grad)
        param.grad = None
        if bucket.state is BucketState.READY:
            self.strategy.on_grads_done(owner)
        if self._arrival is None:  # the first backward only stages: its layout is provisional
            self.grad_sync.on_bucket_progress()

    def _on_backward_end(self) -> None:
        self._in_backward = False
        self.strategy.on_backward_end()
        if self._arrival is not None:
            self._relayout_by_arrival()
        self.grad_sync.on_backward_end()
        if self._host_step is not None and self._host_step.early and self._at_boundary():
            self.grad_sync.finish()  # the last buckets go down (and their chunks to the worker) now

    def _relayout_by_arrival(self) -> None:
        """After the first backward: re-pack the buffers in gradient arrival order if the strategy
        says so (stages 1-2, as DDP does after its first iteration)."""
        arrival, self._arrival = self._arrival, None
        order = self.strategy.order_by_arrival(arrival, list(self._names), self.buffers)
        if order is not None:
            # Same Parameter objects: their grad hooks stay, and _on_grad reads the new side table.
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
        for b in self.buckets:
            if not b.offloaded:
                b.point_grads(shards[b.index], self._unused)

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
        on_device = [p.piece for b in self.buckets if not b.offloaded for p in b.pieces]
        # Device buckets first (ratio < 1): their kernels are queued at once and run on the GPU
        # while the host steps the rest.
        self._host_step.run(self.optimizer, on_device, self._unused)
        for piece in on_device:
            piece.grad = None  # stepped already: the user's own step has nothing left to do
        if self._host_step.pending:  # overlap_forward: the worker may be stepping offloaded pieces
            self._hidden.hide(self.optimizer, on_device)  # until _after_step

    def _flush_offloaded(self) -> None:
        """Send down what backward did not: every offloaded bucket's grad is then wholly on the host."""
        for b in self.buckets:
            if b.grad.main_grad is not None:
                self._on_reduced(b.index, boundary=True)

    def _on_reduced(self, i: int, boundary: bool | None = None) -> None:
        """Bucket ``i``'s reduction has landed: if it is offloaded, at the last micro-step of an
        accumulation its main grad goes to the host now, while backward goes on, and leaves the device."""
        b = self.buckets[i]
        gb = b.grad
        if boundary is None:
            boundary = self._at_boundary()
            # Once a bucket was reduced again after it went down (a loop that accumulates without
            # telling us), grads wait on the device until the step: one host copy each, no extras.
            boundary = boundary and not self._host_step.accumulating
        if not b.offloaded or not boundary:
            return
        self._host_step.download(i, gb.main_grad)
        gb.main_grad, gb.main_on_host = None, True
        if self._host_step.early:
            self._host_step.ready(i, step_overlap.used_flags(self.ctx, b.params, self._used, gb.buffer.device,
                                                             f"used-param flags of bucket {i}"))

    def _at_boundary(self) -> bool:
        """Whether the current backward ends a gradient accumulation."""
        return self._boundary_source() if self._boundary_source is not None else self._boundary

    def set_step_in_backward(self, enabled: bool, *, overlap_forward: bool = False,
                             speculation: SpeculationPolicy | None = None) -> None:
        """Let the host step of offloaded buckets run during backward ([Note: step in backward] in
        host_step.py). Without ``speculation`` only for runs that never clip (``clip_grad_norm_``
        refuses then), since the global norm is known only after backward; with a
        ``SpeculationPolicy`` (the Trainer's when ``max_grad_norm`` > 0) chunks are stepped as if no
        clipping were needed and redone from a copy when it was ([Note: speculation] in
        speculation.py), bit for bit the step without overlap. ``overlap_forward``: and let
        ``optimizer.step()`` return before the host is done, the next forward waiting for each
        bucket's new params as it needs them; between the step and the next backward, read the
        params through the engine (``gathered``, state dicts, the Trainer's saves) or call
        ``settle()`` first. Nothing changes without optimizer offload."""
        setting = (enabled, enabled and overlap_forward, speculation if enabled else None)
        if self._host_step is not None:
            self._host_step.settle()
            self._host_step.overlap(*setting)  # refused mid-step: the setting in force stays ([Note: settle mid-step])
        self._step_in_backward = setting

    @property
    def speculation(self) -> SpeculationPolicy | None:
        """The policy of speculative host steps (its counters: steps speculated, redone): None
        without optimizer offload or without ``set_step_in_backward(True, speculation=...)``."""
        return self._step_in_backward[2] if self.offload is not None else None

    @property
    def device_leg(self):
        """The host step's device leg (``DeviceLeg``, its counters: chunks and elements stepped on
        the device), None without ``offload_optimizer.device_share`` ([Note: device leg])."""
        return self._host_step.leg if self._host_step is not None else None

    def settle(self) -> None:
        """Every offloaded bucket's optimizer step is done and its params are in place (the
        current stream waits for their uploads): a no-op unless ``set_step_in_backward(True,
        overlap_forward=True)`` left the host step running past ``optimizer.step()``."""
        self._hidden.show()  # (a user step that raised never reached _after_step)
        if self._host_step is not None:
            self._host_step.settle()

    def _grad_shards(self) -> list[torch.Tensor]:
        """Each bucket's reduced grad shard this step, where it is now (device, or host if offloaded;
        None for one the host step keeps on the device for its leg: [Note: kept leg grads])."""
        return [self._host_step.host_grads.get(b.index) if self._grads_on_host and b.offloaded else b.grad.main_grad
                for b in self.buckets]

    def _globally_unused(self) -> set:
        params = list(self._names)
        if self.ctx.world_size == 1:  # nothing to agree on: no flags on the device, no sync with it
            return {p for p in params if p not in self._used}
        used = torch.tensor([p in self._used for p in params], dtype=torch.int32, device=self.buffers[0].device)
        C.wait(C.start_all_reduce(self.ctx, used, label="used-param flags"))  # one tiny all-reduce per step
        return {p for p, u in zip(params, used.tolist()) if u == 0}

    # ---- clipping ---------------------------------------------------------------------------

    @labelled("hf_zero::grad_norm")
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the reduced gradients, as ``clip_grad_norm_`` of plain DDP reports it."""
        self.finish_grad_sync()
        self.apply_pending_clip()  # clipped already this step: the norm of the clipped grads
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
        return self.buckets[i].offloaded and self._host_step.downloaded(i)

    @labelled("hf_zero::clip_grad_norm")
    def clip_grad_norm_(self, max_norm: float, total: torch.Tensor | None = None) -> torch.Tensor:
        """Scale the main grads so their global norm is at most ``max_norm``; return the norm before.
        ``total``: that norm where the caller computed it over more than this engine's group (tensor
        parallel: over dp and tp, hf_zero/tensor_parallel/norm.py)."""
        host_step = self._host_step
        if host_step is not None and host_step.early and host_step.speculation is None and max_norm != float("inf"):
            raise RuntimeError(
                f"clip_grad_norm_({max_norm}): the optimizer step of offloaded buckets ran during backward "
                "(ZeroEngine.set_step_in_backward(True) without a speculation policy), so their gradients can "
                "no longer be clipped; set_step_in_backward(True, speculation=SpeculationPolicy()) to clip")
        total = self.grad_norm() if total is None else total
        if max_norm != float("inf"):
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch's clip_grad_norm_
            if self._host_step is None and clip_in_step.applies(self.optimizer):
                self._clip_in_step = (coef, clip_in_step.start(self.optimizer, coef))  # [Note: clip in the step]
                return total
            self._scale_device_grads(coef)
            if self._host_step is not None:
                self._host_step.scale = coef  # the host grads are scaled as the host step reads them
        return total

    # ---- after the optimizer step -----------------------------------------------------------

    @labelled("hf_zero::after_step")
    def _after_step(self) -> None:
        self._hidden.show()
        self._end_clip_in_step(inside_step=True)
        handles = []
        for b in self.buckets:
            b.settle_shard()  # parameter offload: the shards below may be host shards
        with torch.no_grad():
            if self._host_step is not None:
                self._host_step.wait_uploads()  # offloaded buckets: uploaded by the host step
            for b in self.buckets:
                if b.master is None:
                    continue  # no optimizer yet: nothing has stepped
                b.write_back(uploaded=self._grads_on_host)
                if b.stays_whole:  # other stage-3 units: gathered at their next use
                    if b.offloaded and self.ctx.world_size > 1:  # (one rank gathers nothing)
                        self._host_step.wait_chunk_of(b.index)  # overlap_forward: its step may still run
                    handles.append(b.start_gather(self.ctx))
        for h in handles:
            with record_function("hf_zero::wait_param_all_gather"):
                C.wait(h)
        self.zero_grad()
        if self.offload is not None and self.offload.auto and self._host_step is not None:
            self.auto_ratio = auto_ratio.decide(self)  # [Note: auto ratio]: once, after the first step
            self.place_offload(self.auto_ratio.ratio)
            auto_ratio.say(self.auto_ratio)

    def place_offload(self, ratio: float) -> None:
        """Offload ``ratio`` of the optimizer's elements from now on: the masters and optimizer
        state of the buckets that change sides move (auto_ratio.place; [Note: auto ratio])."""
        auto_ratio.place(self, ratio)

    def _scale_device_grads(self, coef: torch.Tensor) -> None:
        shards = self._grad_shards()
        on_device = [g for i, g in enumerate(shards) if self._host_step is None or not self._on_host(i)]
        for grads in _by_device(on_device):
            torch._foreach_mul_(grads, coef.to(grads[0].device))

    def apply_pending_clip(self) -> None:
        """Before anything but the optimizer's step reads the main grads (a second norm or clip in
        one step): the clip coefficient the optimizer holds is applied to them now and taken back
        from it ([Note: clip in the step]). A no-op when none is held."""
        if self._clip_in_step is not None:
            coef = self._clip_in_step[0]
            self._end_clip_in_step()
            self._scale_device_grads(coef)

    def _end_clip_in_step(self, inside_step: bool = False) -> None:
        if self._clip_in_step is not None:
            clip_in_step.end(self.optimizer, self._clip_in_step[1], inside_step)
            self._clip_in_step = None

    def zero_grad(self) -> None:
        """Idempotent: forget this step's gradients (consumed by the step, or the step was skipped)."""
        self._end_clip_in_step()  # a skipped step must not take this step's clip coefficient
        for bucket in self.grad_sync.buckets:
            bucket.finish_reduce()  # no collective may be left in flight
        for b in self.buckets:
            if not b.offloaded:  # offloaded: the host step's own
                b.clear_grads()  # let the main grads go until the next backward
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
        self.strategy.check_repack()
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
        self.strategy.close()  # parameter offload to NVMe: its swap files too
        for h in self._hooks + self._grad_hooks:
            h.remove()
        self._hooks.clear()
        self._grad_hooks.clear()
        self.closed = True


def _staged_grads(old: GradSync) -> dict[nn.Parameter, torch.Tensor]:
    """Each full param's staged, not yet reduced gradient in ``old``'s buckets (a re-layout)."""
    out = {}
    for gb in old.buckets:
        if gb.staging is not None:
            for i in gb.bucket.slots:
                r = gb.buffer.slots[i].range.shift(gb.bucket.range.start)
                out[gb.buffer.params[i]] = gb.staging[r.start : r.end]
    return out


def _by_device(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[t.device].append(t)
    return list(groups.values())
