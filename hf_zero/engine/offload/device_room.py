"""How much device memory was left at the run's peak: the one source of that number.

``offload_optimizer.ratio: "auto"`` ([Note: auto ratio] in auto_ratio.py) sizes the optimizer state
it brings back to the device from it, once, after the first step; the device leg
([Note: leg room] in device_leg.py) checks it at every waiting step before it puts chunks in flight.
Tests replace ``headroom`` (a stand-in device on CPU ranks).
"""

from __future__ import annotations

import torch


def headroom(device: torch.device) -> tuple[int, int] | None:
    """(bytes the device had left at the peak since the process started, the device's memory), or
    None where there is no device memory to ask about (CPU): torch.cuda's counters,

        free now + reserved by torch now - peak reserved by torch
    """
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    reserved, peak = torch.cuda.memory_reserved(device), torch.cuda.max_memory_reserved(device)
    return max(0, free + reserved - peak), total
