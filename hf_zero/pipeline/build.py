"""``build``: split a model for this rank of a pipeline group and return its ``PipelineRunner``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hf_zero.pipeline.runner import PipelineRunner
from hf_zero.pipeline.split import StagePiece, find_decoder, layer_ranges, prune


def virtual_stages(schedule: str) -> int:
    """Pieces per rank: two for interleaved 1F1B, else one."""
    return 2 if schedule == "interleaved_1F1B" else 1


def check(model: nn.Module, stages: int, schedule: str) -> None:
    """Raise ``NotSplittable`` naming the reason if ``model`` cannot be split so (before any work)."""
    decoder = find_decoder(model, stages)
    layer_ranges(decoder.num_layers, stages * virtual_stages(schedule))


def build(model: nn.Module, *, stages: int, schedule: str, group, device: torch.device) -> PipelineRunner:
    """Every rank of the pipeline ``group`` (``stages`` ranks, in stage order): prune ``model`` in place to
    this rank's pieces (rank r: piece r, and r + stages when interleaved) and return their runner."""
    decoder = find_decoder(model, stages)
    virtual = virtual_stages(schedule)
    count = stages * virtual
    ranges = layer_ranges(decoder.num_layers, count)
    rank = dist.get_rank(group)
    indices = [rank + k * stages for k in range(virtual)]
    loss_function, vocab_size = model.loss_function, decoder.lm_head.out_features  # before the head may go
    prune(model, decoder, [ranges[i] for i in indices], first=0 in indices, last=count - 1 in indices)
    pieces = [StagePiece(model, decoder, ranges[i], first=i == 0, last=i == count - 1) for i in indices]
    return PipelineRunner(pieces, indices, count, group, device, schedule, loss_function, vocab_size)
