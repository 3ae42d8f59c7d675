"""``FlatStrategy``: stages 1 and 2, full params packed into flat buffers, sharded in buckets.

- layout: one ``FlatParamBuffer`` per (dtype, device) of the trainable params, cut into buckets
  of about ``bucket_numel`` elements; each bucket is one ``ShardedBucket``;
- after the first backward the buffers are re-packed once in gradient arrival order (as DDP
  does), so a bucket never waits for one late gradient;
- after each optimizer step every bucket all-gathers its new shards into the full params
  (``ShardedBucket.stays_whole``).
Stage 1 and 2 differ only in when gradients are reduced (``StageStrategy.reduce_every_microstep``).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from hf_zero.engine import collectives as C
from hf_zero.engine.grad_sync import GradBucket
from hf_zero.engine.layout import FlatParamBuffer
from hf_zero.engine.sharded_bucket import ShardedBucket
from hf_zero.engine.stages import StageBehaviour, StageStrategy


class FlatStrategy(StageBehaviour):
    def __init__(self, knobs: StageStrategy, *, ctx: C.CommContext, bucket_numel: int,
                 param_dtype: torch.dtype | None, offload_param=None, source=None) -> None:
        super().__init__(knobs)
        if offload_param is not None:
            raise ValueError(f"parameter offload (offload_param.device = {offload_param.device!r}) needs ZeRO stage 3, "
                             f"got stage {knobs.stage}")
        if source is not None:
            raise ValueError("a model loaded sharded (hf_zero.init) needs ZeRO stage 3")
        self.ctx, self.bucket_numel, self.param_dtype = ctx, bucket_numel, param_dtype

    def build(self, named: list, *, first: bool) -> tuple[list, list]:
        by_kind: dict[tuple, list] = defaultdict(list)
        for name, param in named:
            by_kind[(param.dtype, param.device)].append((name, param))
        buffers = [FlatParamBuffer(ps, world_size=self.ctx.world_size, rank=self.ctx.rank,
                                   bucket_numel=self.bucket_numel, dtype=self.param_dtype)
                   for ps in by_kind.values()]
        grads = [GradBucket(buf, b, self.ctx.world_size) for buf in buffers for b in buf.buckets]
        return buffers, [ShardedBucket(i, gb) for i, gb in enumerate(grads)]

    def tracks_arrival(self, world_size: int) -> bool:
        return world_size > 1  # one rank has nothing to overlap

    def order_by_arrival(self, arrival: list, params: list, buffers: list) -> list | None:
        """Buckets launch strictly in index order, so a bucket holding one late gradient (say a
        layer's input norm, registered after its attention) would hold back every later bucket.
        The optimizer has not stepped yet; the engine carries the staged gradients over."""
        index = {p: i for i, p in enumerate(params)}
        arrived = [index[p] for p in dict.fromkeys(arrival)]
        if self.ctx.world_size > 1:  # every rank must build the same buckets: rank 0's order wins
            box = [arrived]
            torch.distributed.broadcast_object_list(box, group_src=0, group=self.ctx.group)  # the group's rank 0
            arrived = box[0]
        seen = set(arrived)
        rest = [i for i in range(len(params)) if i not in seen]
        order = [params[i] for i in reversed(arrived)] + [params[i] for i in rest]  # packed in reverse
        current = [p for buf in buffers for p in reversed(buf.params)]
        return None if [id(p) for p in order] == [id(p) for p in current] else order

    def param_bytes(self, buffers: list) -> int:
        return sum(buf.data.numel() * buf.data.element_size() for buf in buffers)
