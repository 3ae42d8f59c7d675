"""``Trainer.save_model`` at stage 3: streamed unit by unit where it can be, gathered where not.

The weights go through ``hf_zero.checkpoint.hf_save`` (see [Note: streamed save] there): the
same files ``save_pretrained`` writes, without any rank holding the full model, written beside an
earlier save in the folder and swapped in once all are whole (a full disk: one ``DiskFullError``
on every rank, the earlier save intact; hf_zero/checkpoint/atomic.py). The rest of the
folder is written as ``Trainer._save`` writes it: the tokenizer or processor, and the training
arguments. A model whose save cannot be planned from shapes (a weight conversion that computes
new tensors, such as transformers 5.x fused MoE experts; a quantized model; a plain module) is
saved as before: the full state dict gathered to rank 0's CPU, then ``Trainer._save``. That is
announced once per reason, since it needs the model's size in host memory on rank 0.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from hf_zero.checkpoint import hf_save

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()


def save_stage3(trainer, engine, output_dir: str) -> dict[str, torch.Tensor] | None:
    """Write ``trainer.model`` to ``output_dir`` (a collective: every rank calls).

    Returns, on the ranks that wrote, what each written tensor must match (verify.py); else None.
    """
    model, writer = trainer.model, trainer.args.should_save
    try:
        plan = hf_save.plan_save(model, engine.units)
    except hf_save.CannotStream as why:
        return _gathered_save(trainer, engine, output_dir, str(why))
    if writer:
        logger.info("Saving model checkpoint to %s (streamed unit by unit)", output_dir)
    hf_save.save_streamed(model, engine.units, plan, output_dir, writer=writer)
    if writer:
        _save_trainer_files(trainer, output_dir)
    return plan.expected if writer else None


def _gathered_save(trainer, engine, output_dir: str, why: str) -> dict[str, torch.Tensor] | None:
    if not _is_peft(trainer.model) and why not in _WARNED:  # a PEFT save writes only the small adapter
        _WARNED.add(why)
        warnings.warn(
            f"hf_zero: stage-3 save_model gathers the full model on rank 0's CPU for "
            f"{type(trainer.model).__name__}, instead of streaming it unit by unit, because {why}",
            UserWarning,
            stacklevel=3,
        )
    state_dict = engine.full_state_dict(to_cpu_on=0)  # a collective: every rank calls
    # save_pretrained pops what it writes from the dict it is given: hand it a copy.
    trainer._save(output_dir, state_dict=dict(state_dict) if state_dict is not None else None)
    return state_dict


def _save_trainer_files(trainer, output_dir: str) -> None:
    """What ``Trainer._save`` writes besides the model: processing class and training arguments."""
    from transformers.trainer import TRAINING_ARGS_NAME

    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(output_dir)
    elif getattr(trainer.data_collator, "tokenizer", None) is not None:
        logger.info("Saving Trainer.data_collator.tokenizer by default as Trainer.processing_class is `None`")
        trainer.data_collator.tokenizer.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_NAME))


def _is_peft(model) -> bool:
    return type(model).__module__.startswith("peft.")
