"""``Trainer.save_model`` under hf_zero: never written over the earlier save in place.

Stage 3: the weights go through ``hf_zero.checkpoint.hf_save`` (see [Note: streamed save] there):
the same files ``save_pretrained`` writes, without any rank holding the full model, written beside
an earlier save in the folder and swapped in once all are whole (a full disk: one
``DiskFullError`` on every rank, the earlier save intact; hf_zero/checkpoint/atomic.py). The rest
of the folder is written as ``Trainer._save`` writes it: the tokenizer or processor, and the
training arguments. A model whose save cannot be planned from shapes (a weight conversion that
computes new tensors, such as transformers 5.x fused MoE experts; a quantized model; a plain
module) is saved as before: the full state dict gathered to rank 0's CPU, then ``Trainer._save``.
That is announced once per reason, since it needs the model's size in host memory on rank 0.

Stages 1-2 (full params on every rank) and that gathered fallback: ``Trainer._save`` writes into a
hidden folder inside the output folder, whose files are renamed into place once it returns
(``save_whole``; ``StagedFolder`` in atomic.py), so a full disk or a killed save leaves the earlier
weights, config and tokenizer as they were. At stage 3 every rank raises the writer's error (the
save is a collective there already); at stages 1-2 ``save_model`` stays what the Trainer's is,
no collective (a script may call it on rank 0 alone), and the writer raises alone.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from hf_zero.checkpoint import hf_save
from hf_zero.checkpoint.atomic import StagedFolder, raise_first_failure
from hf_zero.checkpoint.safetensors_stream import TensorSpec, file_size, safetensors_order
from hf_zero.first_rank import is_first_rank

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
    hf_save.save_streamed(model, engine.units, plan, output_dir, writer=writer,
                          show_progress=not trainer.args.disable_tqdm)  # the Trainer's switch for its bars
    if writer:
        _save_trainer_files(trainer, output_dir)
    return plan.expected if writer else None


def _gathered_save(trainer, engine, output_dir: str, why: str) -> dict[str, torch.Tensor] | None:
    # A PEFT save writes only the small adapter; every rank comes here, rank 0 says it.
    if not _is_peft(trainer.model) and why not in _WARNED and is_first_rank():
        _WARNED.add(why)
        warnings.warn(
            f"hf_zero: stage-3 save_model gathers the full model on rank 0's CPU for "
            f"{type(trainer.model).__name__}, instead of streaming it unit by unit, because {why}",
            UserWarning,
            stacklevel=3,
        )
    state_dict = engine.full_state_dict(to_cpu_on=0)  # a collective: every rank calls
    save_whole(trainer, output_dir, state_dict, every_rank=True)
    return state_dict


def save_whole(trainer, output_dir: str, state_dict: dict[str, torch.Tensor] | None = None, *,
               every_rank: bool) -> None:
    """``Trainer._save`` of ``state_dict`` (None: the model's own), the writer's files staged in a
    hidden folder and swapped in once whole. ``every_rank``: a collective, and every rank raises
    the writer's failure; else the writer raises alone."""
    writer, failed, needed = trainer.args.should_save, None, None
    # save_pretrained pops what it writes from the dict it is given: hand it a copy.
    given = dict(state_dict) if state_dict is not None else None
    if not writer:  # Trainer._save writes nothing here (it stays only for a collective of save_pretrained)
        trainer._save(output_dir, state_dict=given)
    else:
        needed = _stored_bytes(state_dict if state_dict is not None else trainer.model.state_dict())
        try:
            with StagedFolder(output_dir, needed) as stage:
                trainer._save(stage.path, state_dict=given)
                stage.commit()
        except Exception as error:  # noqa: BLE001 - shared with every rank below, or raised here
            if not every_rank:
                raise
            failed = error
    if every_rank:
        raise_first_failure(failed, output_dir, needed)


def _stored_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    """The bytes of ``state_dict`` as one safetensors file, each storage once (tied weights are
    written once); a sharded save adds only its index."""
    specs: dict[tuple, TensorSpec] = {}
    for name, t in state_dict.items():
        if torch.is_tensor(t):
            key = (id(t),) if t.device.type == "meta" else (t.device, t.untyped_storage().data_ptr(), t.storage_offset())
            specs.setdefault(key, TensorSpec(name, tuple(t.shape), t.dtype))
    return file_size(safetensors_order(list(specs.values())))


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
