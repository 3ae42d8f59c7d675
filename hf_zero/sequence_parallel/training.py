"""What the Trainer seams (hf_zero/trainer/seams.py) call for sequence parallelism.

| seam | call | what it does |
|---|---|---|
| ``__init__``, before the Trainer's | ``take_trainer_size`` | a ``parallelism_config`` with sp_size > 1 is taken over: its size goes to ``resolve_config``, the Trainer gets none (its own sp path is DeepSpeed's: its data loader adapter and loss import deepspeed) |
| ``__init__``, after ``resolve_config`` | ``setup`` | the layout's process groups, the checks on the Trainer and model, Ulysses attention on |
| ``get_train_dataloader`` | ``split_loader`` (batch_split.py) | one batch per SP group, each rank's slice |
| ``compute_loss`` | ``compute_loss`` | the loss over the group (loss.py) |
"""

from __future__ import annotations

import inspect

from hf_zero.sequence_parallel.layout import KEY, SpLayout, build_layout
from hf_zero.sequence_parallel.batch_split import split_loader  # the get_train_dataloader seam calls it from here
from hf_zero.sequence_parallel.loss import group_count, token_mean
from hf_zero.sequence_parallel.ulysses import enable


def take_trainer_size(args) -> int | None:
    """The sp_size of ``args.parallelism_config`` (None without one, or at 1); above 1 the Trainer's
    ``parallelism_config`` becomes None (hf_zero runs the sequence parallelism)."""
    config = getattr(args, "parallelism_config", None)
    size = getattr(config, "sp_size", None)
    if config is None or size is None or size <= 1:
        return None
    others = {f"{name}_size": getattr(config, f"{name}_size") for name in ("dp_shard", "tp", "cp")
              if getattr(config, f"{name}_size", 1) not in (None, 1)}
    if others:
        raise NotImplementedError(f"TrainingArguments.parallelism_config sp_size = {size} with {others}: not built yet "
                                  f"in hf_zero; sequence parallelism runs beside ZeRO's data parallelism only")
    args.parallelism_config = None
    return size


def setup(trainer, size: int) -> SpLayout:
    """Every rank: the groups, the checks, and the model's attention through Ulysses."""
    if trainer.label_smoother is not None or trainer.compute_loss_func is not None:
        what = "label_smoothing_factor" if trainer.label_smoother is not None else "compute_loss_func"
        raise NotImplementedError(f"{KEY} = {size} with the Trainer's {what}: not built yet in hf_zero (the loss of a "
                                  "split batch is the model's causal-LM loss on shift_labels)")
    if not getattr(trainer, "_loss_shifts_labels", False):
        raise ValueError(f"{KEY} = {size}: {type(trainer.model).__name__} is not a causal LM whose loss is "
                         "transformers' ForCausalLMLoss (the split batch hands it labels shifted on the whole sequence)")
    forward = inspect.signature(trainer.model.forward).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in forward):
        raise ValueError(f"{KEY} = {size}: {type(trainer.model).__name__}.forward takes no **kwargs, so it cannot be "
                         "given shift_labels")
    layout = build_layout(size)
    enable(trainer.model, layout)
    return layout


def compute_loss(trainer, original, layout: SpLayout, model, inputs, return_outputs, num_items_in_batch):
    """The Trainer's ``compute_loss`` on a split batch (loss.py says which count each case uses)."""
    if not model.training:  # evaluation: batches are not split, attention runs unsplit (ulysses.py)
        return original(trainer, model, inputs, return_outputs, num_items_in_batch)
    if trainer.model_accepts_loss_kwargs and num_items_in_batch is not None:
        if not (trainer.args.average_tokens_across_devices and trainer.args.world_size > 1):
            num_items_in_batch = group_count(num_items_in_batch, layout)  # this rank's count -> the group's / P
        return original(trainer, model, inputs, return_outputs, num_items_in_batch)
    # A per-batch mean: the model returns this slice's sum (a count of 1), combined over the group.
    local_sum, outputs = original(trainer, model, {**inputs, "num_items_in_batch": 1}, True, None)
    loss = token_mean(local_sum, inputs["shift_labels"], layout)
    return (loss, outputs) if return_outputs else loss
