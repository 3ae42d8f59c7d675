"""The (dp, tp) mesh: which ranks hold the same tensor-parallel shard, and which ranks split one layer.

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
