"""Optimizer offload: fp32 master shards, optimizer state and the optimizer step on the host.

With ``offload_optimizer.device = "cpu"`` the buckets chosen by ``OptimizerOffload.offloaded``
keep their fp32 master shard in host memory (pinned when CUDA is there), so the optimizer
creates its state there too and steps on the CPU (``torch.optim.AdamW(fused=True)`` has a fused
CPU kernel). Per step, for each offloaded bucket:

    reduce-scatter (device) -> copy main grad shard down (during backward) -> clip scale
    -> optimizer step (host) -> copy master shard up, cast to the param dtype on the device
    -> all-gather (stages 1-2) or the next forward's gather (stage 3)

pipelined as host_step.py describes. The device keeps only the param shards and, during
backward, a bounded number of gradient buckets. ``ratio`` (any stage; DeepSpeed allows it at
stage 3 only) offloads only that fraction of the optimizer state, counted in elements, bucket
by bucket; the rest stays on the device and is stepped there while the host steps the rest.

Not yet: the NVMe tier, parameter offload (stage 3), and overlapping the host step with
backward or the next forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimizerOffload:
    """Where the optimizer of offloaded buckets runs: ``device`` "cpu" (the only tier built)."""

    device: str = "cpu"
    pin_memory: bool = True
    ratio: float = 1.0  # fraction of the optimizer state's elements on the host, in (0, 1]
    chunk_numel: int = 1 << 26  # host-step pipeline granularity (host_step.py): elements per chunk

    def __post_init__(self) -> None:
        if self.device != "cpu":
            raise ValueError(f"optimizer offload to {self.device!r} is not built; only 'cpu'")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"offload ratio must be in (0, 1], got {self.ratio}")

    def offloaded(self, shard_sizes: list[int]) -> list[bool]:
        """Which buckets (by their shard sizes, in bucket order) keep their optimizer on the host:
        the first ones until ``ratio`` of all elements is reached."""
        total, acc, out = sum(shard_sizes), 0, []
        for size in shard_sizes:
            out.append(acc < self.ratio * total)
            acc += size
        return out

    def host_tensor(self, like: torch.Tensor) -> torch.Tensor:
        """An fp32 host tensor of ``like``'s size, pinned when CUDA can use it, holding its values."""
        pin = self.pin_memory and torch.cuda.is_available()
        out = torch.empty(like.shape, dtype=torch.float32, device="cpu", pin_memory=pin)
        out.copy_(like)
        return out

