"""The (dp, tp) mesh: which ranks hold the same tensor-parallel shard, and which ranks split one layer;
the (pp, dp) mesh of pipeline stages (below).

W = dp * tp ranks are laid out tp-inner, as Megatron and accelerate do::

    W = 4, tp = 2:   global rank   0   1   2   3
                     dp rank       0   0   1   1      (ZeRO shards over ranks of one tp rank)
                     tp rank       0   1   0   1      (one layer's shards, same batch)

so the ranks of a tp group are neighbours (one node under ``hf-zero launch``), the tp group of rank r
is ``[r - r % tp, ..., r - r % tp + tp - 1]`` and its dp group is ``[r % tp, r % tp + tp, ...]``.

The dims are named ``("dp_shard", "tp")``: accelerate's names, because its data loader reads this
mesh (``hf_zero/trainer/tensor_parallel.py``) and gives every rank of a tp group the same batch only
for those names; ZeRO's data-parallel dimension shards optimizer state, accelerate's "dp_shard".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hf_zero.config.checks import world_axis

DP_DIM, TP_DIM = "dp_shard", "tp"


@dataclass(frozen=True)
class TpMesh:
    """This rank's place on the (dp, tp) mesh and the two process groups."""

    dp: int  # data-parallel size: ZeRO shards over this many ranks
    tp: int  # tensor-parallel size: each planned layer is split over this many ranks
    dp_rank: int
    tp_rank: int
    device_mesh: DeviceMesh

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """The ranks holding the same tp shard: ZeRO's group (``ZeroEngine(group=...)``)."""
        return self.device_mesh.get_group(DP_DIM)

    @property
    def tp_group(self) -> dist.ProcessGroup:
        """The ranks splitting one layer: the all-reduces of the split layers."""
        return self.device_mesh.get_group(TP_DIM)


def check_tp_size(tp: int, world_size: int, *, key: str = "tensor_parallel.autotp_size") -> None:
    """``tp`` must be a positive integer dividing the world size."""
    world_axis(tp, world_size, key=key, off="no tensor parallelism", layout="(dp, tp) = (world size / tp, tp)")


def build_mesh(tp: int, device_type: str) -> TpMesh:
    """Every rank calls it (it creates the process groups): the (W / tp, tp) mesh on ``device_type``."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_tp_size(tp, world)
    if not dist.is_initialized():
        raise ValueError(f"tensor_parallel.autotp_size = {tp} needs torch.distributed initialized "
                         "(launch with hf-zero launch or torchrun)")
    mesh = init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=(DP_DIM, TP_DIM))
    return TpMesh(dp=world // tp, tp=tp, dp_rank=mesh.get_local_rank(DP_DIM), tp_rank=mesh.get_local_rank(TP_DIM),
                  device_mesh=mesh)


# ---- pipeline stages -----------------------------------------------------------------------------
# The (pp, dp) mesh of pipeline parallelism (hf_zero/pipeline), the (dp, tp) one above generalised to
# (pp, dp, tp) with tp = 1 (the two together are not built yet), stage-outer as Megatron lays them out:
#
#     W = 4, stages = 2:   global rank   0   1   2   3
#                          stage         0   0   1   1      (a pipeline: one rank of each stage)
#                          dp rank       0   1   0   1      (ZeRO shards over the ranks of one stage)
#
# so rank r is stage r // dp, dp rank r % dp; its pipeline is [r % dp, r % dp + dp, ...], its dp group
# the ranks of its stage. Pipeline sends cross stages, so stages go where links are slowest (nodes).
PP_DIM = "pp"


@dataclass(frozen=True)
class PpMesh:
    """This rank's place on the (pp, dp) mesh and its two process groups."""

    pp: int  # pipeline stages
    dp: int  # data-parallel size: ZeRO shards over this many ranks of one stage
    pp_rank: int  # this rank's stage
    dp_rank: int
    device_mesh: DeviceMesh

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """The ranks of this stage: ZeRO's group (``ZeroEngine(group=...)``)."""
        return self.device_mesh.get_group(DP_DIM)

    @property
    def pp_group(self) -> dist.ProcessGroup:
        """One rank of each stage, in stage order: the pipeline's sends and receives."""
        return self.device_mesh.get_group(PP_DIM)


def build_pp_mesh(pp: int, device_type: str) -> PpMesh:
    """Every rank calls it (it creates the process groups): the (pp, W / pp) mesh on ``device_type``."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    world_axis(pp, world, key="pipeline.stages", off="no pipeline", layout="(pp, dp) = (stages, world size / stages)")
    if not dist.is_initialized():
        raise ValueError(f"pipeline.stages = {pp} needs torch.distributed initialized "
                         "(launch with hf-zero launch or torchrun)")
    mesh = init_device_mesh(device_type, (pp, world // pp), mesh_dim_names=(PP_DIM, DP_DIM))
    return PpMesh(pp=pp, dp=world // pp, pp_rank=mesh.get_local_rank(PP_DIM), dp_rank=mesh.get_local_rank(DP_DIM),
                  device_mesh=mesh)
