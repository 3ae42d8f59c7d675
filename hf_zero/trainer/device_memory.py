"""Where the run report reads a rank's device and its peak memory: CUDA's allocator on a GPU, the
process's peak RSS on CPU.

The CUDA readings go through one small value, :class:`MemorySource`, which the report callback is
given (``ReportCallback(session, memory=...)``): the default reads ``torch.cuda``; a test gives a
stand-in, so the report's CUDA branch runs on a machine without a GPU (tests/trainer/test_report_cuda.py).
"""

from __future__ import annotations

import dataclasses
import resource
import socket
from collections.abc import Callable

import torch

PEAK_KINDS = {"cuda_max_allocated": "CUDA max allocated", "host_peak_rss": "host peak RSS"}
"""``peak_memory.kind`` -> how the summary names it."""


@dataclasses.dataclass(frozen=True)
class MemorySource:
    """What the report asks of a CUDA device."""

    max_allocated: Callable[[torch.device], int]
    """Peak bytes the caching allocator handed out on the device (``torch.cuda.max_memory_allocated``)."""
    properties: Callable[[torch.device], tuple[str, int]]
    """The device's name and total memory in bytes (``torch.cuda.get_device_properties``)."""


def _cuda_properties(device: torch.device) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(device)
    return props.name, props.total_memory


CUDA = MemorySource(max_allocated=torch.cuda.max_memory_allocated, properties=_cuda_properties)


def peak_memory(device: torch.device, memory: MemorySource = CUDA) -> dict:
    """``{"kind", "bytes"}``: the allocator's peak on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(memory.max_allocated(device))}
    return {"kind": "host_peak_rss", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def device_facts(device: torch.device, memory: MemorySource = CUDA) -> dict:
    """This rank's device: ``cuda:0`` with the GPU's name and memory, or ``cpu``; and the host."""
    facts = {"device": str(device), "host": socket.gethostname()}
    if device.type == "cuda":
        name, total = memory.properties(device)
        facts.update(name=name, memory_bytes=int(total))
    return facts
