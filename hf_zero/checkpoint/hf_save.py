"""Stage-3 weights to Hugging Face safetensors, streamed unit by unit: no rank holds the full model.

[Note: streamed save]
``save_pretrained`` needs the whole state dict in memory; at stage 3 that means gathering the
model onto one rank. Yet everything it decides about the files depends only on names, shapes and
dtypes, which every rank knows without gathering (the units' buffers hold each sharded param's
full shape, trainable and frozen; buffers and params kept whole are whole on every rank). So:

1. plan (every rank, no data): the state dict as shape-only ``meta`` tensors, each sharded param
   with its full shape and the dtype the gather produces (the unit's buffer dtype), run through
   ``save_pretrained``'s own key steps (``_keys_to_ignore_on_save``, ``remove_tied_weights_from_
   state_dict``, ``revert_weight_conversion``) and its own split (``split_torch_state_dict_into_
   shards``). The keys, their order and the files are therefore exactly ``save_pretrained``'s.
   A conversion that only renames or reorders keeps each placeholder object; one that computes
   new tensors (transformers 5.x fused MoE experts, written back per expert) does not, and such a
   model raises ``CannotStream`` (the caller then gathers the full state dict, as before).
2. the writing ranks open every file and write its header (every offset is known);
3. every rank, unit by unit: ``unshard()`` (the collective), the writers write each param's bytes
   at its offset, ``reshard()``; then the tensors outside units (buffers, params kept whole);
4. the writers close the files and write the index as ``save_pretrained`` does, all under
   hidden temporary names; then they are renamed into place together, the earlier save's files
   that this one does not have are removed ([Note: write beside, then swap], atomic.py), and the
   config and generation config are written. A full disk is raised on every rank as one
   ``DiskFullError``; the earlier save stays as it was.

Peak: one unit gathered (where training gathers it) plus one tensor staged on the host, not the
model. Each unit is gathered once: files are written out of order (safetensors_stream.py).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass

import torch

from hf_zero.checkpoint.atomic import Swap, raise_first_failure, stale_weights
from hf_zero.checkpoint.safetensors_stream import (INDEX_NAME, SINGLE_NAME, StreamingWriter, TensorSpec,
                                                   file_size, safetensors_order)
from hf_zero.engine.stage3.units import ParamUnit, UnitState
from hf_zero.progress import progress



class CannotStream(Exception):
    """This model's save cannot be planned from shapes alone; the message says why."""


def default_max_shard_size() -> int | str:
    """What ``save_pretrained`` uses when not told (the Trainer never tells it): "50GB" in 5.x."""
    from transformers import PreTrainedModel

    return inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default


@dataclass(frozen=True)
class SavePlan:
    """What a streamed save writes, known before any data is gathered."""

    files: dict[str, list[TensorSpec]]  # file name -> its tensors, in the data order safetensors uses
    source: dict[str, str]  # written name -> the model's state-dict key (differs only under renames)
    index: dict | None  # model.safetensors.index.json's content; None: one file
    expected: dict[str, torch.Tensor]  # written name -> meta tensor of its shape and dtype (verify.py)


def unsupported(model) -> str | None:
    """Why ``model`` is not saved the ``save_pretrained`` way streamed here (None: it is)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return f"{type(model).__name__} is not a PreTrainedModel (the Trainer saves its plain state dict)"
    if getattr(model, "_hf_peft_config_loaded", False):
        return "it has transformers-integrated PEFT adapters (save_pretrained writes only the adapter)"
    if getattr(model, "hf_quantizer", None) is not None:
        return "it is quantized (save_pretrained asks the quantizer for the state dict)"
    if getattr(model, "_tp_size", None) is not None:
        return "it is tensor-parallel (save_pretrained gathers it its own way)"
    return None


def _full_shapes(units: list[ParamUnit]) -> dict[int, tuple[tuple[int, ...], torch.dtype]]:
    """id(param) -> (full shape, dtype after the gather) for every sharded param, frozen ones too."""
    return {id(p): (tuple(part.buffer.shapes[slot.name]), part.buffer.dtype)
            for u in units for part in u.parts for p, slot in zip(part.buffer.params, part.buffer.slots)}


@torch.no_grad()
def plan_save(model, units: list[ParamUnit], *, max_shard_size: int | str | None = None) -> SavePlan:
    """Step 1 of [Note: streamed save]; raises ``CannotStream``. No communication."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    reason = unsupported(model)
    if reason is not None:
        raise CannotStream(reason)
    full = _full_shapes(units)
    placeholders: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if not torch.is_tensor(t):
            raise CannotStream(f"its state dict holds a {type(t).__name__} under {key!r}, not a tensor")
        shape, dtype = full.get(id(t), (tuple(t.shape), t.dtype))
        placeholders[key] = torch.empty(shape, dtype=dtype, device="meta")
    origin = {id(t): key for key, t in placeholders.items()}
    state = dict(placeholders)
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    try:  # save_pretrained's own steps, on shapes only
        state = remove_tied_weights_from_state_dict(state, model)
        state = revert_weight_conversion(model, state)
    except Exception as error:  # noqa: BLE001 - whatever fails on shapes alone, the full gather can do
        raise CannotStream(f"planning its save_pretrained on shapes alone failed ({error!r})") from error
    source = {}
    for name, t in state.items():
        if id(t) not in origin:
            raise CannotStream(
                f"its save_pretrained converts weights back to the checkpoint layout (revert_weight_conversion "
                f"writes {name!r}, computed from the model's tensors), which needs the gathered tensors"
            )
        source[name] = origin[id(t)]
    split = split_torch_state_dict_into_shards(
        state, filename_pattern=SINGLE_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=default_max_shard_size() if max_shard_size is None else max_shard_size,
    )
    files = {file: safetensors_order([TensorSpec(n, tuple(state[n].shape), state[n].dtype) for n in names])
             for file, names in split.filename_to_tensors.items()}
    index = None
    if split.is_sharded:
        total = sum(math.prod(full.get(id(p), (tuple(p.shape),))[0]) for _, p in model.named_parameters())
        index = {"metadata": {"total_parameters": total, **split.metadata}, "weight_map": split.tensor_to_filename}
    return SavePlan(files, source, index, state)


@torch.no_grad()
def save_streamed(model, units: list[ParamUnit], plan: SavePlan, output_dir: str, *, writer: bool,
                  show_progress: bool = True) -> None:
    """Steps 2-4 of [Note: streamed save]. A collective: every rank calls, ``writer`` ranks write.
    ``show_progress``: a "Writing model shards" bar on rank 0, a step per unit (hf_zero/progress.py).

    The files are written beside an earlier save and swapped in once all are whole ([Note: write
    beside, then swap], atomic.py). A writer that fails (a full disk) stops writing but goes on
    gathering with the others, so no rank is left waiting in a collective; then every rank raises
    the error of the lowest writer that failed."""
    # save_pretrained records these on the config on every rank before writing it.
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    live = model.state_dict(keep_vars=True)
    names_of: dict[int, list[str]] = defaultdict(list)  # id(tensor) -> written names
    for name, key in plan.source.items():
        names_of[id(live[key])].append(name)
    writers: dict[str, StreamingWriter] = {}
    where: dict[str, StreamingWriter] = {}
    swap = None
    failed: BaseException | None = None

    def guarded(step, *args) -> None:
        nonlocal failed
        if failed is None:
            try:
                step(*args)
            except Exception as error:  # noqa: BLE001 - raised on every rank below, after the gathers
                failed = error

    def open_files() -> None:
        nonlocal swap
        os.makedirs(output_dir, exist_ok=True)
        needed = sum(file_size(specs) for specs in plan.files.values())
        swap = Swap(output_dir, needed)
        for file, specs in plan.files.items():
            writers[file] = StreamingWriter(os.path.join(output_dir, file), specs, temp=swap.temp(file))
            where.update({s.name: writers[file] for s in specs})

    def write(tensor: torch.Tensor) -> None:
        for name in names_of.get(id(tensor), ()):
            where[name].write(name, tensor.detach())

    try:
        if writer:
            guarded(open_files)
        in_units = set()
        for unit in progress(units, desc="Writing model shards", unit="unit", disable=not (writer and show_progress)):
            was_full = unit.state is UnitState.UNSHARDED  # a persistent unit always is
            unit.unshard()  # every rank: the all-gather (waits for a prefetch in flight instead)
            try:
                for p in unit.params():  # trainable and frozen
                    in_units.add(id(p))
                    if writer:
                        guarded(write, p)
            finally:
                if not was_full:
                    unit.reshard()
        if writer:
            for t in {id(t): t for t in live.values() if id(t) not in in_units}.values():
                guarded(write, t)  # buffers and params kept whole (below the persistence threshold)
            for w in writers.values():
                guarded(w.close)
            guarded(_finish, model, plan, output_dir, swap)
    except BaseException:
        _discard(writers, swap)
        raise
    if failed is not None:
        _discard(writers, swap)
    raise_first_failure(failed, output_dir, swap.needed if swap is not None else None)


def _discard(writers: dict[str, StreamingWriter], swap: Swap | None) -> None:
    """Close and remove every temporary file of a save that failed; the earlier save stays."""
    for w in writers.values():
        w.abort()
    if swap is not None:
        swap.abort()


def _finish(model, plan: SavePlan, output_dir: str, swap: Swap) -> None:
    """Index, then the swap (new files in place, stale ones out), then config: as
    ``save_pretrained`` leaves the folder."""
    if plan.index is not None:
        with open(swap.temp(INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(plan.index, indent=2, sort_keys=True) + "\n")
    # save_pretrained removes numbered shards a new save does not write. A single file or an
    # index from an earlier save of the other layout goes too: loaders would read it first.
    swap.commit(stale_weights(os.listdir(output_dir), list(plan.files) + [INDEX_NAME] * (plan.index is not None)))
    if model.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, output_dir, config=model.config)
    model.config.save_pretrained(output_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(output_dir)
