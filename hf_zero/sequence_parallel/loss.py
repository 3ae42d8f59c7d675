"""The loss of a split batch: the unsplit model's, and gradients that average to the unsplit model's.

Each rank's forward sees its slice of the sequence; its loss covers only its slice's tokens, but its
gradients reach the other ranks' activations through the all-to-alls. Summed over the P ranks of a
group, the gradients of the slices' losses are the gradient of the whole sequence's loss. ZeRO (or
DDP) averages gradients over all W = P * D ranks, so each rank backpropagates P times its share; the
loss value itself stays the whole sequence's.

How the Trainer normalizes decides what this rank's share is (``num_items_in_batch``: the real
tokens of the optimizer step's micro-batches, counted by the Trainer from each rank's ``shift_labels``
slice, batch_split.py):

| Trainer                                   | count it passes             | hf_zero's change                       |
|-------------------------------------------|-----------------------------|----------------------------------------|
| average_tokens_across_devices (default)   | all ranks' slices: the true total | none: sum / total, times W by the Trainer |
| not averaged across devices               | this rank's slices          | the group's count / P (``group_count``)|
| model_accepts_loss_kwargs False           | none: a per-batch mean      | ``token_mean``: (sum, count) over the group |
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_zero.sequence_parallel.layout import SpLayout

IGNORE = -100


def group_count(count, layout: SpLayout) -> torch.Tensor:
    """This rank's token count -> its group's, divided by P: sum / this equals P * sum / group count."""
    total = torch.as_tensor(count).detach().to(torch.float64).clone()  # a fraction once divided by P
    dist.all_reduce(total, group=layout.group)
    return (total / layout.size).float()  # the loss keeps its dtype


def token_mean(local_sum: torch.Tensor, shift_labels: torch.Tensor, layout: SpLayout) -> torch.Tensor:
    """The mean over the real tokens of the group's whole sequences, from this slice's sum of token
    losses; its gradient is P times this slice's share (module docstring)."""
    count = (shift_labels != IGNORE).sum()
    totals = torch.stack([local_sum.detach().float(), count.float().to(local_sum.device)])
    dist.all_reduce(totals, group=layout.group)
    scaled = local_sum * layout.size
    return (scaled + (totals[0] - scaled.detach()).to(scaled.dtype)) / totals[1].clamp(min=1).to(scaled.dtype)
