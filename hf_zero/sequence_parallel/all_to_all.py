"""``all_to_all``: the one collective of Ulysses, differentiable.

Each of the P ranks of an SP group cuts its tensor into P equal chunks along ``scatter_dim``, sends
chunk j to rank j, and concatenates what it receives, in rank order, along ``gather_dim``. Two ranks,
a query of 4 heads over a sequence of 8 split in two (``[b, heads, seq, dim]``)::

    before: rank 0 holds heads 0-3 of tokens 0-3     rank 1 holds heads 0-3 of tokens 4-7
    all_to_all(x, scatter_dim=1 (heads), gather_dim=2 (seq))
    after:  rank 0 holds heads 0-1 of tokens 0-7     rank 1 holds heads 2-3 of tokens 0-7

The exchange is a permutation of the group's elements, so its adjoint is its inverse: backward runs
the same exchange with the two dims swapped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.profiler import record_function


def _exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    parts = dist.get_world_size(group)
    if x.shape[scatter_dim] % parts:
        raise AssertionError(f"all_to_all: dim {scatter_dim} of shape {tuple(x.shape)} does not split in {parts}")
    with record_function("hf_zero::ulysses_all_to_all"):
        send = torch.stack(x.chunk(parts, dim=scatter_dim))  # [P, ...]: chunk j goes to rank j
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=group)
        return torch.cat(received.unbind(0), dim=gather_dim)  # rank i's chunk at position i


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims = (scatter_dim, gather_dim)
        ctx.group = group
        return _exchange(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """``x`` split along ``scatter_dim`` over the group, gathered along ``gather_dim`` (module docstring)."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)
