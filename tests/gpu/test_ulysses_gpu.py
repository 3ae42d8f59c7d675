"""GPU twin of ``tests/sequence_parallel/test_ulysses.py``: Ulysses under NCCL, one GPU per rank.

SP 2 at W = 2 and SP 2 x dp 2 at W = 4, stages 0-3, fp32 with TF32 off: the all-to-alls move values
without arithmetic and each head's attention is the same computation as in the unsplit model, so
losses, gradients and SGD steps are held to 1e-5 relative, as on CPU. Skips without enough GPUs.
"""

from __future__ import annotations

import pytest
import torch

from hf_zero.testing.multiprocess import run_on_ranks
from tests.sequence_parallel.test_ulysses import _parity


def _gpu_parity(rank, world, sp, stage):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return _parity(rank, world, sp, stage, "sdpa", "cuda")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ulysses_nccl(world, stage):
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    run_on_ranks(_gpu_parity, world, 2, stage, timeout=300, backend="nccl")
