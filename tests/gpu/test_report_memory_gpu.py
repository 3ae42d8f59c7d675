"""The run report's default memory source is torch.cuda (hf_zero/trainer/device_memory.py); its CUDA
branch with a stand-in source is tested on CPU in tests/trainer/test_report_cuda.py."""

from __future__ import annotations

import pytest
import torch

from hf_zero.trainer.device_memory import CUDA, device_facts, peak_memory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_the_default_source_is_torch_cuda():
    device = torch.device("cuda", 0)
    held = torch.empty(2**20, device=device)  # 4 MiB, so the peak is not 0
    facts = device_facts(device, CUDA)
    assert facts["name"] == torch.cuda.get_device_name(device)
    assert facts["memory_bytes"] == torch.cuda.get_device_properties(device).total_memory
    assert peak_memory(device, CUDA) == {"kind": "cuda_max_allocated", "bytes": torch.cuda.max_memory_allocated(device)}
    assert peak_memory(device, CUDA)["bytes"] >= held.numel() * 4
