"""The global gradient norm under tensor parallelism: split params summed over tp, replicated ones once.

Each tp rank holds different parts of the split params and the same copy of every other param
(split.py, [Note: f and g]). The squared global norm of the whole model's gradient is

    |g|^2 = sum over tp ranks of S_t  +  R

with S_t the squared norm of tp rank t's split parts and R that of the replicated params (the same on
every tp rank: counted once, not tp times). Each rank sums its two parts locally, over its dp group
first where ZeRO sharded them (each dp rank holds a different shard), then S over the tp group.
Rank 0 of a W = 2, tp = 2 job with S_0 = 9, S_1 = 16, R = 11: after the tp all-reduce both ranks
hold S = 25 and return sqrt(25 + 11) = 6.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hf_zero.engine import collectives as C


def global_norm(parts: Iterable[tuple[torch.Tensor, bool]], *, tp: C.CommContext,
                dp: C.CommContext | None, device: torch.device) -> torch.Tensor:
    """``parts``: (gradient tensor, whether it is a split param's) on this rank; ``dp``: the group
    the tensors are sharded over (ZeRO), None where every dp rank holds them whole (stage 0)."""
    sums = torch.zeros(2, dtype=torch.float32, device=device)  # [split, replicated]
    for grad, split in parts:
        sums[0 if split else 1] += grad.detach().float().pow(2).sum()
    if dp is not None:
        C.wait(C.start_all_reduce(dp, sums, label="tp grad norm (dp)"))
    C.wait(C.start_all_reduce(tp, sums[:1], label="tp grad norm (tp)"))  # a view: reduced in place
    return sums.sum().sqrt()


def module_parts(model: nn.Module, split: set[str]) -> list[tuple[torch.Tensor, bool]]:
    """Every gradient of ``model`` (stage 0: whole params, DDP-averaged over dp)."""
    return [(p.grad, n in split) for n, p in model.named_parameters() if p.grad is not None]


def engine_parts(engine, split: set[str]) -> list[tuple[torch.Tensor, bool]]:
    """Every param's slice of this rank's reduced grad shards (ZeRO stages 1-3; padding is left out)."""
    if engine.offload is not None:  # the grads live on the host: a config the table refuses before any rank starts
        raise AssertionError("engine_parts: an offloaded engine under tensor parallelism; the row "
                             "'tensor-parallel-offload' of hf_zero/config/unsupported.py should have refused it")
    engine.finish_grad_sync()
    engine.apply_pending_clip()  # a second clip in one step reads the grads as clipped
    names = {p: n for n, p in engine.model.named_parameters()}
    out = []
    for b in engine.buckets:
        shard = b.grad.main_grad
        if shard is None:
            continue
        buffer = b.grad.buffer
        for slot, r in buffer.pieces(b.grad.bucket):
            out.append((shard[r.start : r.end], names[buffer.params[slot]] in split))
    return out
