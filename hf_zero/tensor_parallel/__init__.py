"""Tensor parallelism with ZeRO: planned Linear layers split over a tp group, ZeRO over the dp group.

- ``mesh.py``: the (pp, dp, tp) mesh and its process groups (stage-outer, tp-inner rank layout), for tensor
  parallelism, pipeline stages and both;
- ``plan.py``: which layers are split and how, from the model's own ``tp_plan`` (transformers'
  vocabulary) or the plan of a common decoder block;
- ``split.py``: the split itself, Megatron-style, as plain local tensors ([Note: f and g], and
  [Note: why not DTensor]);
- ``norm.py``: the global gradient norm over dp and tp, replicated params counted once.
"""

from hf_zero.tensor_parallel.mesh import ParallelMesh, build_mesh, build_parallel_mesh, check_tp_size
from hf_zero.tensor_parallel.split import TpLayout, gather_split, split_model

__all__ = ["ParallelMesh", "TpLayout", "build_mesh", "build_parallel_mesh", "check_tp_size", "gather_split", "split_model"]
