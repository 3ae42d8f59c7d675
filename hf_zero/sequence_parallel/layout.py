"""``SpLayout``: which ranks split one sequence, and which ranks see different data.

With sequence parallel size P the W ranks are laid out sp-inner, as DeepSpeed's
``initialize_sequence_parallel`` and accelerate's meshes do::

    W = 4, P = 2:   global rank   0   1   2   3
                    sp rank       0   1   0   1      (which slice of the sequence)
                    dp rank       0   0   1   1      (which batch: the data loader sees W / P replicas)

so the ranks of one SP group are neighbours (one node under ``hf-zero launch``): the group of rank r
is ``[r - r % P, ..., r - r % P + P - 1]``. Every rank holds the whole model, as under plain data
parallelism (ALST's design): ZeRO keeps sharding over all W ranks, unchanged ([Note: Ulysses] in
``__init__.py`` says why the gradients still come out right).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from hf_zero.config.checks import world_axis

KEY = "sequence_parallel_size"


@dataclass(frozen=True)
class SpLayout:
    """This rank's place in the (dp, sp) layout and its SP process group."""

    size: int  # P: ranks splitting one sequence
    rank: int  # this rank's slice of the sequence, 0 .. P - 1
    dp_size: int  # W / P: groups that see different batches
    dp_rank: int  # this rank's group
    group: dist.ProcessGroup  # the P ranks of this rank's group


def check_size(size: object, world_size: int, *, key: str = KEY) -> int:
    """``size`` must be an integer >= 1 dividing the world size; returns it."""
    return world_axis(size, world_size, key=key, off="no sequence parallelism",
                      layout=f"(data parallel, sequence parallel) = (world size / {key}, {key})")


_GROUPS: dict[tuple[int, int], SpLayout] = {}  # (P, id of the world group) -> this process's layout


def build_layout(size: int) -> SpLayout:
    """Every rank calls it (it creates the W / P process groups, in the same order on every rank)."""
    if not dist.is_initialized():
        raise ValueError(f"{KEY} = {size} needs torch.distributed initialized (launch with hf-zero launch or torchrun)")
    world, me = dist.get_world_size(), dist.get_rank()
    check_size(size, world)
    cache_key = (size, id(dist.group.WORLD))
    if cache_key not in _GROUPS:
        mine = None
        for first in range(0, world, size):  # new_group is collective: every rank creates every group
            group = dist.new_group(list(range(first, first + size)))
            if first <= me < first + size:
                mine = group
        _GROUPS[cache_key] = SpLayout(size=size, rank=me % size, dp_size=world // size, dp_rank=me // size,
                                      group=mine)
    return _GROUPS[cache_key]
