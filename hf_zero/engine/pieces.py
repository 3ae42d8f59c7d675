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

from hf_zero.engine.offload.host_memory import HostMemory
from hf_zero.first_rank import is_first_rank
from hf_zero.progress import progress
from hf_zero.engine.offload.host_step import HostStep


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    if optimizer.state:
        raise ValueError("ZeroEngine needs an optimizer that has not stepped yet (its state is not empty)")
    if type(optimizer).__name__ == "Adafactor" and is_first_rank():  # every rank builds it: said once per job
        warnings.warn(
            "Adafactor under hf_zero steps on flat pieces of each param (1-D), so it keeps unfactored "
            "second moments: a different (more memory-hungry) update than Adafactor on whole matrices",
            UserWarning,
            stacklevel=3,
        )


def build_masters(engine, replacing: bool = False) -> HostStep | None:
    """fp32 master shards (on the host for offloaded buckets), the optimizer's pieces, and the
    optimizer pointed at them; returns the host step of the offloaded buckets, if any.
    ``replacing``: an earlier host step's masters and state are still held (carried over), so the
    host's memory is not checked against the new need ([Note: host room]: the first build was)."""
    buckets = engine.buckets
    # Buckets whose master, optimizer state and step live on the host (offload.py).
    sizes = [b.shard_numel for b in buckets]
    offloaded = engine.offload.offloaded(sizes, _first_ratio(engine, sizes)) if engine.offload \
        else [False] * len(sizes)
    host_step = None
    if any(offloaded):
        host_step = HostStep(offloaded, sizes, buckets[0].buffer.device, HostMemory(engine.offload.pin_memory),
                             engine.streams, engine.offload.chunk_numel, offload=engine.offload, ctx=engine.ctx,
                             optimizer=engine.optimizer, check_room=not replacing)
        engine.grad_sync.on_reduced = engine._on_reduced
    # Optimizer offload to NVMe: each offloaded master is written to its swap file here (a bar on rank 0).
    to_disk = host_step is not None and host_step.tier.on_disk
    for b, off in progress(list(zip(buckets, offloaded)), desc="Writing fp32 masters to NVMe", unit="bucket",
                           disable=not to_disk):
        b.offloaded = off
        b.build_master(host_step)
    rewrite_optimizer(engine)
    if host_step is not None:
        host_step.bind(engine.optimizer, buckets)
        host_step.overlap(*engine._step_in_backward)  # [Note: step in backward], [Note: speculation]
        # [Note: step in backward], overlap_forward: what the next forward waits for (step_overlap.py).
        engine._gates.lay_out(engine.model, buckets)
    return host_step


def _first_ratio(engine, sizes: list[int]) -> float | None:
    """The ratio the layout starts with: the setting's; with "auto" in host memory, what the host
    holds of ratio 1 ([Note: auto ratio], ``host_room.auto_start``: a collective, every rank), also
    when the first backward re-lays the buckets out (``replacing``: still "auto" then)."""
    offload = engine.offload
    if not offload.auto or offload.device != "cpu":
        return None
    from hf_zero.engine.offload import host_room
    from hf_zero.engine.offload.nvme_swap import bytes_per_element

    per_element = bytes_per_element(engine.optimizer, offload.state_dtype)
    return host_room.auto_start(sizes, per_element, host_room.readings(engine.ctx),
                                 lambda r: offload.offloaded(sizes, r))


def rewrite_optimizer(engine) -> None:
    """Point the optimizer's groups (as the user built them, in full params) at the pieces."""
    seen = set()
    model_params = {id(q) for q in engine.model.parameters()}
    piece_of = {p.param: p.piece for b in engine.buckets for p in b.pieces}
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
            if p in piece_of:
                pieces.append(piece_of[p])
        group["params"] = pieces
    # Trainable params the optimizer does not update: their gradients are still reduced (they may
    # feed clipping), but they get no piece and no optimizer state.
    for b in engine.buckets:
        b.keep_pieces(seen)
    if not any(g["params"] for g in engine.optimizer.param_groups):
        # This rank's shards hold only padding: give the optimizer an empty tensor to step.
        empty = nn.Parameter(torch.zeros(0, device=engine.buffers[0].device))
        empty.grad = torch.zeros(0, device=engine.buffers[0].device)
        engine.optimizer.param_groups[0]["params"] = [empty]
