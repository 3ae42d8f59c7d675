"""What an engine holds, measured from the tensors themselves (the run report's bytes).

``host_offload``: host memory of optimizer offload (masters, state, grads, chunk buffers) and of
parameter offload (the units' param shards: ``params`` then counts only what is on the device; with
NVMe the staging buffers they are read through);
``nvme_offload``: the masters, state and param shards that NVMe offload keeps in swap files."""

from __future__ import annotations

import torch


def held_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds right now, measured from the tensors themselves."""

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    buffered = {p for buf in engine.buffers for p in buf.params} | {p for u in engine.units for p in u.params()}
    params = engine.strategy.param_bytes(engine.buffers)
    params += sum(nbytes(p) for p in engine.model.parameters() if p not in buffered)
    # NVMe offload: offloaded masters and state are swap-file pages, counted apart from host memory;
    # the tier says which buckets' (all, or with host_share those past the host chunks: split_tier.py).
    tier = engine._host_step.tier if engine._host_step is not None else None
    masters = host = disk = 0
    on_disk_piece = {}  # id(piece) of an offloaded bucket -> its state is on disk
    for b in engine.buckets:
        if b.master is None:
            continue
        if b.offloaded:
            on_disk = tier.on_disk_of(b.index)
            on_disk_piece.update({id(p.piece): on_disk for p in b.pieces})
            if on_disk:
                disk += nbytes(b.master)
            else:
                host += nbytes(b.master)
        else:
            masters += b.master_bytes()
    state = 0
    # Copies of the state's items: the host step's worker may be adding state right now (host_step.py,
    # [Note: step in backward]), so a first step may count part of it.
    for piece, s in (list(engine.optimizer.state.items()) if engine.optimizer is not None else ()):
        n = sum(nbytes(v) for v in list(s.values()) if torch.is_tensor(v) and v.dim() > 0)
        if on_disk_piece.get(id(piece)):
            disk += n
        elif id(piece) in on_disk_piece:
            host += n
        else:
            state += n
    host += engine._host_step.host_bytes() if engine._host_step is not None else 0
    shard_bytes = sum(u.host_bytes() for u in engine.units)  # parameter offload: the param shards
    memory = engine.strategy.param_memory
    if memory is not None and memory.on_disk:
        disk += shard_bytes
        host += memory.staging_bytes()  # the buffers its shards are read through (nvme_staging.py)
    else:
        host += shard_bytes
    grads = sum(b.grad.held_bytes() for b in engine.buckets)
    return {"params": params, "grads": grads, "peak_grads": engine.grad_sync.peak_grad_bytes,
            "optimizer_state": state + masters, "host_offload": host, "nvme_offload": disk}
