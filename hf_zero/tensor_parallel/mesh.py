"""The (pp, dp, tp) mesh: which ranks split one layer (tp), which hold the same part and shard ZeRO over
it (dp), which run one pipeline (pp, one rank of each stage); one builder for every combination.

W = pp * dp * tp ranks are laid out stage-outer and tp-inner, as Megatron lays them out::

    W = 8, pp = 2, tp = 2:   global rank   0   1   2   3   4   5   6   7
                             stage (pp)    0   0   0   0   1   1   1   1   (a stage's ranks hold its layers)
                             dp rank       0   0   1   1   0   0   1   1   (ZeRO shards over one stage and tp rank)
                             tp rank       0   1   0   1   0   1   0   1   (one layer's parts, same batch)

so rank r is stage r // (dp * tp), dp rank (r // tp) % dp, tp rank r % tp: the ranks of a tp group are
neighbours (one node under ``hf-zero launch``), a pipeline joins the ranks of the same (dp, tp)
coordinates ([0, 4], [1, 5], ...: pipeline sends cross stages, so stages go where links are slowest),
and a dp group holds one stage's ranks of one tp rank ([0, 2], [1, 3], [4, 6], [5, 7]).

Only the axes in use are dims of the device mesh: ``("dp_shard", "tp")`` with tensor parallelism alone,
``("pp", "dp_shard")`` with pipeline stages alone, ``("pp", "dp_shard", "tp")`` with both. The names are
accelerate's where it has them: with tp alone its data loader reads this mesh (hf_zero/trainer/tensor_parallel.py)
and gives every rank of a tp group the same batch; with pipeline stages accelerate's formula (rank // tp)
would count the stages as dp ranks, so hf_zero deals the batches itself (``shard_loader`` in
hf_zero/trainer/pipeline.py: dp rank d the d-th share, every rank of a pipeline and tp group the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hf_zero.config.checks import divisors, world_axis

PP_DIM, DP_DIM, TP_DIM = "pp", "dp_shard", "tp"
TP_KEY, PP_KEY = "tensor_parallel.autotp_size", "pipeline.stages"


@dataclass(frozen=True)
class ParallelMesh:
    """This rank's place on the (pp, dp, tp) mesh and its process groups (an axis of size 1 has none)."""

    pp: int  # pipeline stages
    dp: int  # data-parallel size: ZeRO shards over this many ranks (of one stage and tp rank)
    tp: int  # tensor-parallel size: each planned layer is split over this many ranks
    pp_rank: int  # this rank's stage
    dp_rank: int
    tp_rank: int
    device_mesh: DeviceMesh

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """The ranks of this stage holding the same tp part: ZeRO's group (``ZeroEngine(group=...)``)."""
        return self.device_mesh.get_group(DP_DIM)

    @property
    def tp_group(self) -> dist.ProcessGroup:
        """The ranks splitting one layer: the all-reduces of the split layers."""
        return self._group(TP_DIM, self.tp)

    @property
    def pp_group(self) -> dist.ProcessGroup:
        """One rank of each stage with this rank's (dp, tp) coordinates, in stage order: the pipeline's
        sends and receives."""
        return self._group(PP_DIM, self.pp)

    def _group(self, dim: str, size: int) -> dist.ProcessGroup:
        if size == 1:
            raise AssertionError(f"the {dim!r} group of a mesh without that axis (size 1) was asked for")
        return self.device_mesh.get_group(dim)


def check_tp_size(tp: int, world_size: int, *, key: str = TP_KEY) -> None:
    """``tp`` must be a positive integer dividing the world size."""
    world_axis(tp, world_size, key=key, off="no tensor parallelism", layout="(dp, tp) = (world size / tp, tp)")


def check_sizes(world_size: int, *, tp: int = 1, pp: int = 1) -> None:
    """``tp`` divides the world size and ``pp`` the world size / tp, each named with its key."""
    check_tp_size(tp, world_size)
    if tp == 1:
        world_axis(pp, world_size, key=PP_KEY, off="no pipeline", layout="(pp, dp) = (stages, world size / stages)")
    elif isinstance(pp, int) and pp >= 1 and (world_size // tp) % pp:
        raise ValueError(f"{PP_KEY} = {pp} with {TP_KEY} = {tp}: stages * autotp_size = {pp * tp} does not divide the "
                         f"world size {world_size}: the ranks are laid out as (pp, dp, tp) = (stages, world size / "
                         f"(stages * autotp_size), autotp_size); allowed stages here: {divisors(world_size // tp)}")
    else:
        world_axis(pp, world_size // tp, key=PP_KEY, off="no pipeline", layout="(pp, dp, tp)")


def build_parallel_mesh(device_type: str, *, tp: int = 1, pp: int = 1) -> ParallelMesh:
    """Every rank calls it (it creates the process groups): the (pp, W / (pp * tp), tp) mesh on ``device_type``."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_sizes(world, tp=tp, pp=pp)
    if not dist.is_initialized():
        asked = " and ".join(f"{k} = {v}" for k, v in ((PP_KEY, pp), (TP_KEY, tp)) if v > 1)
        raise ValueError(f"{asked} needs torch.distributed initialized (launch with hf-zero launch or torchrun)")
    dp = world // (pp * tp)
    axes = [(n, s) for n, s in ((PP_DIM, pp), (DP_DIM, dp), (TP_DIM, tp)) if s > 1 or n == DP_DIM]
    mesh = init_device_mesh(device_type, tuple(s for _, s in axes), mesh_dim_names=tuple(n for n, _ in axes))
    rank = {n: mesh.get_local_rank(n) for n, _ in axes}
    return ParallelMesh(pp=pp, dp=dp, tp=tp, pp_rank=rank.get(PP_DIM, 0), dp_rank=rank[DP_DIM],
                        tp_rank=rank.get(TP_DIM, 0), device_mesh=mesh)


def build_mesh(tp: int, device_type: str) -> ParallelMesh:
    """The (W / tp, tp) mesh of tensor parallelism alone."""
    return build_parallel_mesh(device_type, tp=tp)


def build_pp_mesh(pp: int, device_type: str) -> ParallelMesh:
    """The (pp, W / pp) mesh of pipeline stages alone."""
    return build_parallel_mesh(device_type, pp=pp)
