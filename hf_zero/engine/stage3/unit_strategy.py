"""``UnitStrategy``: stage 3, params sharded in units and gathered around their use (units.py).

- layout: the model is planned into units (unit_plan.py: its ``_no_split_modules`` blocks and the
  root); each unit's trainable params are one flat buffer of one bucket (one ``ShardedBucket``
  each), its frozen params are sharded beside them (unit_buffer.py); a model on the meta device
  is filled shard by shard from its ``source`` (hf_zero/init);
- hooks: ``UnitHooks`` gather each unit before its forward and backward and release it after;
  a unit's full params go as soon as its gradients are in; none at one rank without parameter
  offload ([Note: nothing to gather]);
- the layout is fixed by module order: never re-packed; after the optimizer step only the
  persistent unit is gathered, the others at their next use;
- parameter offload keeps the units' shards in host memory or swap files (``param_memory``).
"""

from __future__ import annotations

import torch
from torch import nn

from hf_zero.engine import collectives as C
from hf_zero.engine.grad_sync import GradBucket
from hf_zero.engine.layout import FlatParamBuffer
from hf_zero.engine.materialize import materialize_units
from hf_zero.engine.sharded_bucket import ShardedBucket
from hf_zero.engine.stages import StageBehaviour, StageStrategy
from hf_zero.engine.streams import Streams
from hf_zero.engine.offload.tiers import param_memory
from hf_zero.engine.stage3.unit_plan import plan_units
from hf_zero.engine.stage3.units import UnitHooks, make_units

ONE_BUCKET = 2**62  # a unit's trainable params are one bucket, whatever their size


class UnitStrategy(StageBehaviour):
    def __init__(self, knobs: StageStrategy, *, model: nn.Module, ctx: C.CommContext, streams: Streams,
                 param_dtype: torch.dtype | None, persistence_threshold: int = 0, prefetch_numel: int = 0,
                 max_live_numel: int | None = None, offload_param=None, source=None) -> None:
        super().__init__(knobs)
        self.model, self.ctx, self.streams, self.param_dtype = model, ctx, streams, param_dtype
        self.persistence_threshold = persistence_threshold
        self.prefetch_numel, self.max_live_numel = prefetch_numel, max_live_numel
        self.param_memory = param_memory(offload_param, model, ctx) if offload_param is not None else None
        self.source = source
        self.unit_hooks: UnitHooks | None = None  # when each unit is gathered and released

    def build(self, named: list, *, first: bool) -> tuple[list, list]:
        if not first:
            raise AssertionError("stage 3 units are built once: their frozen params are sharded already")
        # Frozen params are planned into the units too (unit_buffer.py), so that the frozen base
        # of a LoRA fine-tune is sharded as well.
        frozen = [(n, p) for n, p in self.model.named_parameters() if not p.requires_grad]
        plans = plan_units(self.model, named, frozen, self.persistence_threshold, self.param_dtype)
        buffers = [FlatParamBuffer(plan.trainable, world_size=self.ctx.world_size, rank=self.ctx.rank,
                                   bucket_numel=ONE_BUCKET, dtype=self.param_dtype)
                   for plan in plans if plan.trainable]
        self.units = make_units(self.model, plans, buffers, self.ctx, self.streams, host=self.param_memory)
        if self.source is not None:
            materialize_units(self.units, self.source)
        with_grads = [u for u in self.units if u.buffer is not None]  # one bucket each, same order
        buckets = [ShardedBucket(i, GradBucket(u.buffer, u.buffer.buckets[0], self.ctx.world_size), u)
                   for i, u in enumerate(with_grads)]
        return buffers, buckets

    def install(self) -> list:
        self.unit_hooks = UnitHooks(self.model, self.units, prefetch_numel=self.prefetch_numel,
                                max_live_numel=self.max_live_numel)
        # [Note: nothing to gather] At one rank with the shards on the device every unit is
        # ``single``: its params are views of its shard, never gathered nor dropped, so the hooks
        # would only keep the books. Without them a compiled model is not broken into one graph
        # per unit around eager hooks ([Note: compiled forward] in units.py): the host time
        # between those regions left the GPU idle (issue 21's profile, bench/results/
        # h100_session11_compile_summary.md). The grad hooks (engine.py) stay: they fill the buckets.
        if all(unit.single for unit in self.unit_hooks.units):  # the persistent unit is not among them
            return []
        return self.unit_hooks.install()

    def check_repack(self) -> None:
        raise AssertionError("stage 3 units are laid out by module order, never re-packed")

    def on_grads_done(self, bucket: ShardedBucket) -> None:
        self.unit_hooks.on_grads_done(bucket.unit)

    def on_backward_end(self) -> None:
        self.unit_hooks.on_backward_end()

    def param_bytes(self, buffers: list) -> int:
        return sum(u.held_bytes() for u in self.units)  # frozen shards count as params

    def close(self) -> None:
        if self.param_memory is not None:
            self.param_memory.close()  # parameter offload to NVMe: its swap files are deleted
