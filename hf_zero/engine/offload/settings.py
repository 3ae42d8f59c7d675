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

With ``device = "nvme"`` the masters and the optimizer's per-element state of those buckets live
in swap files under ``nvme_path`` instead (``nvme_swap.py``); the host keeps their grads and a
few chunk-sized buffers, through which the host step streams each chunk: read, step, write.
``host_share`` of those elements (the first chunks) may stay in host memory instead, the rest
on NVMe ([Note: host share] in split_tier.py): for state larger than host memory. With
``state_dtype`` "bf16" ([Note: bf16 host state] in state_dtype.py) the per-element state is bf16
in host memory and, with "nvme", in the swap files and chunk buffers too ([Note: bf16 swap files]).

This file holds the two settings; where the state lives is the tier's business, behind the
interfaces of tiers.py (``host_memory.HostMemory`` and ``HostTier``, ``nvme_swap.NvmeTier``,
``nvme_params.NvmeParamMemory``); ``host_step.py`` calls the optimizer's tier around each chunk's step.

Parameter offload (``ParamOffload``, stage 3, ``offload_param.device = "cpu"``) keeps each unit's
param shards in host memory too (units.py, [Note: host shards]); the host step then writes the
updated params into those host shards (a cast on the CPU) instead of uploading them.

With ``offload_param.device = "nvme"`` the shards are views of swap files instead (nvme_params.py).

The host step runs during backward and on into the next forward (host_step.py, [Note: step in
backward]; step_overlap.py); with clipping speculatively, validated against the global norm
(speculation.py, [Note: speculation]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hf_zero.engine.offload.state_dtype import STATE_DTYPES

TIERS = ("cpu", "nvme")


@dataclass(frozen=True)
class OptimizerOffload:
    """Where the optimizer of offloaded buckets runs (on the host, always) and where its masters
    and state live between steps: ``device`` "cpu" (host memory) or "nvme" (files in ``nvme_path``)."""

    device: str = "cpu"
    pin_memory: bool = True
    ratio: float | str = 1.0  # fraction of the optimizer state's elements on the host, in (0, 1]; or
    # "auto": 1 for the first step (less where the host cannot hold it), then chosen by the engine
    # ([Note: auto ratio] in auto_ratio.py)
    chunk_numel: int = 1 << 26  # host-step pipeline granularity (host_step.py): elements per chunk
    nvme_path: str | None = None  # "nvme": the directory that holds this run's swap directory
    buffer_count: int = 4  # "nvme": chunk buffers in host memory (reading ahead, stepping, writing back)
    state_dtype: str = "fp32"  # per-element optimizer state between steps ("bf16": [Note: bf16 host state])
    host_share: float | str = 0.0  # "nvme": share of the offloaded elements whose masters and state stay in
    # host memory, in [0, 1] (0: all in swap files, 1: none); or "auto" ([Note: host share] in split_tier.py)
    device_share: float | str = 0.0  # "cpu", fp32 state: share of the offloaded elements stepped on the device
    # when the step waits for the global norm, in [0, 1] ([Note: device leg] in device_leg.py); or "auto"
    # (chosen from measured rates: [Note: leg share] in leg_share.py)

    def __post_init__(self) -> None:
        if self.device not in TIERS:
            raise ValueError(f"optimizer offload device must be one of {TIERS}, got {self.device!r}")
        if self.ratio != "auto" and not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio <= 1.0):
            raise ValueError(f"offload ratio must be in (0, 1] or 'auto', got {self.ratio!r}")
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("optimizer offload to 'nvme' needs nvme_path (a directory)")
        share = self.host_share
        if share != "auto" and (isinstance(share, bool) or not isinstance(share, (int, float))
                                or not 0.0 <= share <= 1.0):
            raise ValueError(f"offload_optimizer.host_share must be a number in [0, 1] or 'auto', got {share!r}")
        if share != 0 and self.device != "nvme":
            raise ValueError(f"offload_optimizer.host_share {share!r} applies to device 'nvme' only (the share of "
                             f"the offloaded state kept in host memory), got device {self.device!r}; allowed: 0")
        leg = self.device_share
        if leg != "auto" and (isinstance(leg, bool) or not isinstance(leg, (int, float)) or not 0.0 <= leg <= 1.0):
            raise ValueError(f"offload_optimizer.device_share must be a number in [0, 1] or 'auto', got {leg!r}")
        if leg and (self.device != "cpu" or self.state_dtype != "fp32"):
            raise ValueError(f"offload_optimizer.device_share {leg!r} applies to device 'cpu' with state_dtype "
                             f"'fp32' only, got device {self.device!r}, state_dtype {self.state_dtype!r}; allowed: 0")
        if self.buffer_count < 1:
            raise ValueError(f"buffer_count must be >= 1, got {self.buffer_count}")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"optimizer offload state_dtype must be one of {tuple(STATE_DTYPES)}, got {self.state_dtype!r}")

    @property
    def auto(self) -> bool:
        """The ratio is still to be chosen (the engine does, after the first step)."""
        return self.ratio == "auto"

    def offloaded(self, shard_sizes: list[int], ratio: float | None = None) -> list[bool]:
        """Which buckets (by their shard sizes, in bucket order) keep their optimizer on the host:
        the first ones until ``ratio`` (default: this setting's; 1 while "auto") of all elements is
        reached."""
        if ratio is None:
            ratio = 1.0 if self.auto else self.ratio
        total, acc, out = sum(shard_sizes), 0, []
        for size in shard_sizes:
            out.append(acc < ratio * total)
            acc += size
        return out


def ratio_of_first(shard_sizes: list[int], keep: int, offloaded) -> float:
    """The ratio whose split (``offloaded``) offloads exactly the first ``keep`` buckets."""
    total = sum(shard_sizes)
    if keep >= len(shard_sizes) or total == 0:
        return 1.0
    ratio, want = sum(shard_sizes[:keep]) / total, [i < keep for i in range(len(shard_sizes))]
    while offloaded(ratio) != want:  # sum / total x total may round above the sum
        ratio = math.nextafter(ratio, 0.0)
    return ratio


@dataclass(frozen=True)
class ParamOffload:
    """Stage 3: the units' param shards live off the device between uses: in host memory
    (``device`` "cpu"), pinned when ``pin_memory`` and CUDA is there, or in swap files under
    ``nvme_path`` (``device`` "nvme", nvme_params.py); each use uploads the shard and gathers
    from the copy."""

    device: str = "cpu"
    pin_memory: bool = True
    nvme_path: str | None = None

    def __post_init__(self) -> None:
        if self.device not in TIERS:
            raise ValueError(f"parameter offload device must be one of {TIERS}, got {self.device!r}")
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("parameter offload to 'nvme' needs nvme_path (a directory)")
