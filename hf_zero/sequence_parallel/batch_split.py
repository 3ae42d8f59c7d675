"""The training batch cut along the sequence: every rank of an SP group gets the same batch and
keeps its own slice of it.

Two changes to the Trainer's prepared training data loader (``split_loader``):

1. its sampler sees W / P replicas (the data-parallel groups), not W: accelerate's shard of the
   batch sampler (or of an iterable dataset) takes the group's index, so the P ranks of a group
   draw the same samples (as transformers itself re-points that shard for its rebalancing sampler);
2. its collate function is wrapped by ``SplitBatch``: after the user's collator, the batch is cut
   to this rank's slice (``split_batch``).

``split_batch`` on a batch of sequence length s, P ranks, this rank's slice c = s / P::

    labels        -> shift_labels = labels[:, 1:] then -100: shifted on the whole sequence, so the
                     last token of a slice predicts the first token of the next slice
    position_ids  -> arange(s) when absent (each slice keeps its true positions for the rotary embedding)
    every [b, s, ...] tensor -> [:, rank * c : (rank + 1) * c]
    labels        -> the slice of shift_labels (the model computes its loss only when given labels;
                     transformers' ForCausalLMLoss uses shift_labels when it is given, unshifted)
    attention_mask -> dropped, after checking that it only pads on the right (ulysses.py attends
                     causally over the whole sequence; right padding never precedes a real token)

A sequence length that P does not divide, left padding and packed sequences (position ids that
restart) are refused with what to do instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from hf_zero.sequence_parallel.layout import KEY, SpLayout

IGNORE = -100  # transformers' ignore_index


def split_batch(batch: Mapping, size: int, rank: int) -> dict:
    """This rank's slice of a collated causal-LM batch (module docstring)."""
    ids, labels = batch.get("input_ids"), batch.get("labels")
    if not (torch.is_tensor(ids) and torch.is_tensor(labels) and ids.dim() == 2 and labels.shape == ids.shape):
        raise ValueError(f"{KEY} = {size}: each training batch needs input_ids and labels, [batch, sequence] "
                         f"tensors of one shape; got {_shapes(batch)}")
    length = ids.shape[1]
    if length % size:
        raise ValueError(f"{KEY} = {size}: a training batch of sequence length {length} does not split over {size} "
                         f"ranks; pad every batch to a multiple of {size} (e.g. the collator's "
                         f"pad_to_multiple_of={size}, labels padded with -100)")
    _check_right_padded(batch.get("attention_mask"), size)
    positions = _positions(batch.get("position_ids"), ids, size)
    shifted = batch.get("shift_labels")
    if shifted is None:
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    whole = {**{k: v for k, v in batch.items() if k != "attention_mask"}, "position_ids": positions,
             "shift_labels": shifted}
    chunk = length // size
    part = {k: v[:, rank * chunk:(rank + 1) * chunk].contiguous() if _along_sequence(v, length) else v
            for k, v in whole.items()}
    part["labels"] = part["shift_labels"]
    return part


class SplitBatch:
    """A data collator followed by ``split_batch`` (plain attributes: DataLoader workers pickle it)."""

    def __init__(self, collate, size: int, rank: int) -> None:
        self.collate = collate
        self.size = size
        self.rank = rank

    def __call__(self, features):
        return split_batch(self.collate(features), self.size, self.rank)


def split_loader(loader, layout: SpLayout):
    """Make the Trainer's prepared training loader feed one batch per SP group, split (module docstring)."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard

    if isinstance(loader, DataLoaderDispatcher):
        raise NotImplementedError(f"{KEY} = {layout.size} with accelerate's dispatched batches (dispatch_batches, the "
                                  "default for an IterableDataset): not built yet in hf_zero; give the Trainer a "
                                  "map-style dataset, or TrainingArguments(accelerator_config={'dispatch_batches': "
                                  "False})")
    shard = loader.batch_sampler if isinstance(loader.batch_sampler, BatchSamplerShard) else loader.dataset
    if not isinstance(shard, (BatchSamplerShard, IterableDatasetShard)):
        raise AssertionError(f"{KEY}: the training data loader at W > 1 has no accelerate shard "
                             f"({type(loader.batch_sampler).__name__}, {type(loader.dataset).__name__})")
    shard.num_processes = layout.dp_size
    shard.process_index = layout.dp_rank
    iterated = getattr(loader, "base_dataloader", loader)  # accelerate's DataLoaderShard wraps the DataLoader it iterates
    iterated.collate_fn = SplitBatch(iterated.collate_fn, layout.size, layout.rank)
    return loader


def _along_sequence(value, length: int) -> bool:
    return torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == length


def _check_right_padded(mask, size: int) -> None:
    if mask is None:
        return
    mask = mask.bool()
    if mask.dim() != 2 or bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(f"{KEY} = {size}: the attention_mask has a padding position before a real token (left "
                         "padding, or holes): not built yet with sequence parallelism; pad on the right "
                         "(tokenizer.padding_side = 'right')")


def _positions(positions, ids: torch.Tensor, size: int) -> torch.Tensor:
    plain = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    if positions is None:
        return plain
    if positions.shape != ids.shape or not torch.equal(positions, plain.to(positions.dtype)):
        raise NotImplementedError(f"{KEY} = {size}: position_ids other than 0 .. length - 1 in every row (packed "
                                  "sequences): not built yet in hf_zero; leave position_ids out of the batch")
    return positions


def _shapes(batch: Mapping) -> str:
    return ", ".join(f"{k} {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}" for k, v in batch.items())
