"""The two-node job of tests/launcher/test_two_nodes.py under NCCL: two ``hf-zero launch --node_rank N``
commands on one 4-GPU host, each node pinned to its own 2 GPUs (hostfile ``127.0.0.1 slots=4``,
``127.0.0.2 slots=4``, ``--include 127.0.0.1:0,1@127.0.0.2:2,3``: CUDA_VISIBLE_DEVICES 0,1 and 2,3), dp 2 x
tp 2 at ZeRO-2, fp32 with TF32 off. The same checks as on gloo: torchrun's rank order, tp groups {0, 1},
{2, 3} inside a node, losses and clipped norms within 1e-5 of one process (on GPU 0), every collective
of ``train()`` counted by group (tp all-reduces only inside a node; only dp and world collectives
across), the run report's bytes equal to ``hf-zero estimate``'s.

Run on a lent machine with 4 GPUs: ``pytest -q -s tests/gpu/test_two_nodes_nccl.py``."""

import pytest
import torch

from tests.launcher.test_two_nodes import two_node_job


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs (two 'nodes' of 2)")
def test_two_nodes_under_nccl(tmp_path):
    two_node_job(tmp_path, device="cuda", slots=4, include="127.0.0.1:0,1@127.0.0.2:2,3")
