"""The hf_zero engine: ZeRO sharding on torch.distributed collectives.

[Note: vocabulary]
- full param: an ``nn.Parameter`` as the model's modules see it, with its full shape.
- flat buffer: one contiguous 1-D tensor per dtype holding many trainable full params back to
  back; each full param's ``.data`` is a view into it (``FlatParamBuffer``).
- bucket: a contiguous range of a flat buffer (each param starting at a multiple of PARAM_ALIGN = 32
  elements), padded to a multiple of 32 W elements so its W shards stay aligned, that is
  communicated as one collective (``Bucket``). Buckets are numbered in backward order.
- shard: rank r's 1/W slice of a bucket, ``[start + r*S, start + (r+1)*S)`` with S = bucket
  size / W. Each element of a flat buffer is owned by exactly one rank.
- staging gradient: a bucket-sized tensor where the full params' gradients land during backward,
  before the bucket's reduce-scatter.
- main grad shard: the fp32 reduced gradient of one bucket's shard, what the optimizer reads.
- fp32 master shard: the fp32 copy of the local shard that the optimizer updates; when the model
  is already fp32 it is a view into the flat buffer itself (no copy).
- piece: the intersection of one full param with the local shard; the optimizer sees one piece
  per param (so per-param-group settings such as weight decay keep working).
- unit (stage 3): a block of the model's ``_no_split_modules`` (or the root) whose trainable params
  are one bucket, kept as a shard and gathered around its forward and backward (``stage3/units.py``).
- frozen buffer (stage 3): a unit's frozen params (``requires_grad=False``, a LoRA base), one flat
  buffer per dtype in the model's dtype, sharded and gathered with the unit; no grads, masters or
  optimizer pieces (``stage3/unit_buffer.py``).
- host shard (stage 3, parameter offload): a unit's local shard kept in (pinned) host memory; each
  use copies it up and gathers from the copy, the optimizer step writes it on the CPU
  ([Note: host shards] in ``stage3/units.py``).

- sharded bucket: everything of one bucket on this rank, in one object (``ShardedBucket``): its
  staging and main grad (``GradBucket``), its unit at stage 3, its param shard, its fp32 master,
  its optimizer pieces and whether it is offloaded. ``ZeroEngine.buckets`` lists them.
- stage behaviour: what one stage does differently (``StageBehaviour``: ``FlatStrategy`` for
  stages 1-2, ``UnitStrategy`` for stage 3), picked from the knobs of ``StageStrategy``.
- tier: where state lives off the GPU, host memory or NVMe swap files, behind one interface
  (``offload/tiers.py``, [Note: tiers]).
- chunk: consecutive offloaded buckets stepped together on the host (at least
  ``OptimizerOffload.chunk_numel`` elements); the unit of the host step's pipeline.
- slot: one of the NVMe tier's chunk-sized host buffers that a chunk's state passes through
  around its step (chunk c uses slot c mod n; ``offload/nvme_swap.py``).

Layout: this folder is the sharding core (the engine, buckets, stage behaviours, collectives);
``stage3/`` holds the units, ``offload/`` the tiers and the host step, ``diagnostics/`` the
watchdog, the memory accounting and the profiler labels. Stage differences live in ``stages.py``
and the two behaviours; collectives in ``collectives.py``.
"""

from hf_zero.engine.engine import ZeroEngine
from hf_zero.engine.module import ZeroModule

__all__ = ["ZeroEngine", "ZeroModule"]
