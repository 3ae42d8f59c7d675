"""fp32 master shards and the optimizer's pieces ([Note: vocabulary] in ``__init__``).

They come with the optimizer (``ZeroEngine.attach_optimizer``, or the constructor when it is given
one): a model sharded as it loads (hf_zero/init) holds only its param shards until then.

- ``build_masters``: per grad bucket, an fp32 master of the local shard (a view of the shard when
  the model is fp32; on the host for offloaded buckets, offload.py / host_step.py), and one piece
  per full param that meets the shard, a slice of the master the optimizer steps;
- ``rewrite_optimizer``: the optimizer's param groups, as the user built them in full params, are
  rewritten in place to hold those pieces, so weight decay groups and per-group settings survive;
- ``check_optimizer``: what an optimizer must be to be taken.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from hf_zero.engine.host_memory import HostMemory
from hf_zero.engine.host_step import HostStep


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    if optimizer.state:
        raise ValueError("ZeroEngine needs an optimizer that has not stepped yet (its state is not empty)")
    if type(optimizer).__name__ == "Adafactor":
        warnings.warn(
            "Adafactor under hf_zero steps on flat pieces of each param (1-D), so it keeps unfactored "
            "second moments: a different (more memory-hungry) update than Adafactor on whole matrices",
            UserWarning,
            stacklevel=3,
        )


def build_masters(engine) -> None:
    """fp32 master shards (on the host for offloaded buckets), the optimizer's pieces, and the
    optimizer pointed at them."""
    grad_buckets = engine.grad_sync.buckets
    # Buckets whose master, optimizer state and step live on the host (offload.py).
    sizes = [gb.bucket.shard_size for gb in grad_buckets]
    engine._offloaded = engine.offload.offloaded(sizes) if engine.offload else [False] * len(sizes)
    if any(engine._offloaded):
        engine._host_memory = HostMemory(engine.offload.pin_memory)
        engine._host_step = HostStep(engine._offloaded, sizes, grad_buckets[0].buffer.device,
                                     engine._host_memory, engine.streams, engine.offload.chunk_numel,
                                     offload=engine.offload, ctx=engine.ctx, optimizer=engine.optimizer)
        engine.grad_sync.on_reduced = engine._on_reduced
    for i, gb in enumerate(grad_buckets):
        shard = engine._bucket_units[i].local if engine.units else gb.buffer.view(gb.bucket.shard)
        if engine._offloaded[i]:
            master = engine._host_step.master(i, shard.detach())
        elif engine.units and engine._bucket_units[i].host is not None:  # a host shard, a device optimizer
            master = shard.detach().to(gb.buffer.device, torch.float32, copy=True)
        else:
            master = shard if shard.dtype == torch.float32 else shard.detach().float()
        engine.masters.append(master)
        for slot_index, local in gb.buffer.pieces(gb.bucket):
            piece = nn.Parameter(master[local.start : local.end], requires_grad=True)
            engine._pieces[gb.buffer.params[slot_index]] = piece
            engine._piece_grads.append((piece, gb, local, gb.buffer.params[slot_index]))
    rewrite_optimizer(engine)
    if engine._host_step is not None:
        by_bucket: dict[int, list] = {}  # after rewrite_optimizer, which drops pieces it does not step
        for piece, gb, local, param in engine._piece_grads:
            by_bucket.setdefault(engine._bucket_index[id(gb)], []).append((piece, local, param))
        engine._host_step.bind(engine.optimizer, engine.masters, by_bucket, engine._param_shard,
                               engine._settle_param_shard)
        engine._host_step.early, engine._host_step.defer = engine._step_in_backward

        # [Note: step in backward], overlap_forward: what the next forward waits for (step_overlap.py).
        def offloaded_bucket(p):
            i = engine._bucket_index[id(engine._where[p][0])] if p in engine._where else None
            return i if i is not None and engine._offloaded[i] else None

        engine._gates.lay_out(engine.model, offloaded_bucket, engine._bucket_units)


def rewrite_optimizer(engine) -> None:
    """Point the optimizer's groups (as the user built them, in full params) at the pieces."""
    seen = set()
    model_params = {id(q) for q in engine.model.parameters()}
    for group, full_params in zip(engine.optimizer.param_groups, engine._groups_full):
        pieces = []
        for p in full_params:
            if not p.requires_grad and id(p) in model_params:
                continue  # frozen: it never gets a gradient, so the optimizer never moves it
            if p not in engine._where:
                raise ValueError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not a trainable "
                    "parameter of the model; hf_zero can only shard the model's own parameters"
                )
            seen.add(p)
            if p in engine._pieces:
                pieces.append(engine._pieces[p])
        group["params"] = pieces
    missing = [p for p in engine._where if p not in seen]
    if missing:
        # Trainable params the optimizer does not update: their gradients are still reduced
        # (they may feed clipping), but they get no optimizer state.
        for p in missing:
            piece = engine._pieces.pop(p, None)
            engine._piece_grads = [t for t in engine._piece_grads if t[0] is not piece]
    if not any(g["params"] for g in engine.optimizer.param_groups):
        # This rank's shards hold only padding: give the optimizer an empty tensor to step.
        empty = nn.Parameter(torch.zeros(0, device=engine.buffers[0].device))
        empty.grad = torch.zeros(0, device=engine.buffers[0].device)
        engine.optimizer.param_groups[0]["params"] = [empty]
