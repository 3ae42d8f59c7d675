"""Read a DeepSpeed ZeRO checkpoint (stages 1, 2, 3) one param at a time, without DeepSpeed.

``engine.save_checkpoint(dir)`` writes ``dir/latest`` (the tag, e.g. ``global_step2``) and
``dir/global_step2/`` with, for data-parallel world size W:

- model states: ``mp_rank_00_model_states.pt`` (stages 1, 2; rank 0 only) or
  ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` for every rank r (stage 3). Each holds
  ``module`` (the model's state dict as the engine held it: bf16/fp16 params at stages 1-2,
  0-element placeholders at stage 3, and the persistent buffers), ``buffer_names``,
  ``param_shapes`` (one ordered ``{name: shape}`` per optimizer param group: the order the fp32
  masters are packed in), ``shared_params`` (``{alias: name}`` for tied weights) and, at stages
  2 and 3, ``frozen_param_shapes`` / ``frozen_param_fragments`` (params with
  ``requires_grad=False``: whole at stage 2, this rank's partition at stage 3).
- optimizer states: ``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` for every rank r
  (``bf16_`` when the run was bf16). Under ``optimizer_state_dict`` they hold ``zero_stage``,
  ``partition_count`` (W; a list, one per group, at stages 1-2) and this rank's fp32 masters.

How the fp32 masters are laid out (as DeepSpeed's ``deepspeed/utils/zero_to_fp32.py`` reads them):

- Stages 1 and 2 (``single_partition_of_fp32_groups``): per param group, the group's params are
  flattened in ``param_shapes`` order into one buffer, padded at the end to a multiple of 2 W,
  and cut into W equal partitions; rank r saves partition r, with the end padding cut off
  (``group_paddings``), so the last rank's partition can be shorter (or empty): ranks are
  concatenated by their saved sizes. With ``zero_optimization.parameter_alignment`` (DeepSpeed
  0.19.7 and later) each param is followed by ``param_alignment_paddings[group][i]`` padding
  elements so that the next starts 16-byte aligned; older files have no such key and no padding.
- Stage 3 (``fp32_flat_groups``): every param is partitioned on its own: padded to a multiple
  of W and cut into W equal pieces of ``ceil(numel / W)`` elements; rank r's flat groups are its
  pieces of every param, in ``param_shapes`` order, concatenated (the flat groups are sub-groups
  of that one sequence).
- DeepSpeed's ``BF16_Optimizer`` (bf16 at stage 1 with ``data_types.grad_accum_dtype: fp32``)
  saves ``single_partition_of_fp32_groups`` like stages 1-2, with no ``zero_stage`` key and the
  end padding kept; it reads as stage 1.

Tied weights: DeepSpeed names a param by its first name in ``named_parameters()``, so a tied
pair appears once in ``param_shapes`` (for a Hugging Face model with tied embeddings:
``model.embed_tokens.weight``), and the other name (``lm_head.weight``) only in
``shared_params``. :meth:`DeepSpeedCheckpoint.names` lists the first; :meth:`tied_aliases`
maps the others to it. Neither :meth:`names` nor :meth:`extra_tensors` lists an alias.

Files are opened with ``torch.load(..., mmap=True, weights_only=True)``; the few DeepSpeed objects
they pickle (the stage enum, the loss scaler, ...) load as inert stand-ins, so neither DeepSpeed
nor trust in the file is needed, and assembling one param reads only that param's bytes.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

LATEST_NAME = "latest"
MODEL_STATES_SUFFIX = "_model_states.pt"
OPTIM_STATES_SUFFIX = "_optim_states.pt"
_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_STAGE12_KEY, _STAGE3_KEY = "single_partition_of_fp32_groups", "fp32_flat_groups"


class DeepSpeedCheckpointError(ValueError):
    """A folder that cannot be read as a DeepSpeed ZeRO checkpoint: names the file and what is wrong."""


class NotADeepSpeedCheckpoint(DeepSpeedCheckpointError):
    """The folder or file is not what DeepSpeed's ``save_checkpoint`` writes."""


class IncompleteCheckpoint(DeepSpeedCheckpointError):
    """A file some rank should have written is missing, or files of another run are mixed in."""


class UnsupportedCheckpoint(DeepSpeedCheckpointError):
    """A DeepSpeed checkpoint of a kind this reader does not handle (tensor/pipeline parallel, MoE)."""


# ---- loading DeepSpeed's pickles without DeepSpeed ---------------------------------------------


class _Opaque:
    """Stand-in for an object of a class the file names but that is not safe to load (DeepSpeed's
    ``ZeroStageEnum``, ``LossScaler``, ...): keeps its constructor args and state, does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        self = object.__new__(cls)
        self.args, self.state = args, None
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} args={self.args!r}>"


def _stand_in(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return type(name, (_Opaque,), {"__module__": module, "__qualname__": name})


def load_torch_file(path: str) -> dict:
    """``torch.load`` of one DeepSpeed file: memory-mapped, weights only, unknown classes stubbed."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        with torch.serialization.safe_globals([(_stand_in(q), q) for q in unsafe]):
            loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, zipfile errors, ...
        raise NotADeepSpeedCheckpoint(
            f"{path}: cannot be read as a torch checkpoint ({type(err).__name__}: {err}); "
            "expected a file written by DeepSpeed's engine.save_checkpoint"
        ) from err
    if not isinstance(loaded, dict):
        raise NotADeepSpeedCheckpoint(f"{path}: holds a {type(loaded).__name__}, expected DeepSpeed's state dict")
    return loaded


def _enum_value(value: Any) -> Any:
    """The plain value of an enum member that loaded as a stand-in (``ZeroStageEnum(2)`` -> 2)."""
    return value.args[0] if isinstance(value, _Opaque) and len(value.args) == 1 else value


# ---- finding the files ---------------------------------------------------------------------------


def resolve_folder(path: str) -> str:
    """The tag folder (``global_stepN/``) of ``path``: ``path`` itself, or the one ``path/latest`` names."""
    if not os.path.isdir(path):
        raise NotADeepSpeedCheckpoint(f"{path}: no such folder; expected a DeepSpeed checkpoint folder")
    latest = os.path.join(path, LATEST_NAME)
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        folder = os.path.join(path, tag)
        if not tag or not os.path.isdir(folder):
            raise IncompleteCheckpoint(
                f"{latest} names the tag {tag!r}, but {folder} is not a folder; expected the folder "
                "DeepSpeed's save_checkpoint wrote next to it"
            )
        return folder
    if any(n.endswith((MODEL_STATES_SUFFIX, OPTIM_STATES_SUFFIX)) for n in os.listdir(path)):
        return path
    raise NotADeepSpeedCheckpoint(
        f"{path}: not a DeepSpeed checkpoint: it has no {LATEST_NAME!r} file and no "
        f"*{MODEL_STATES_SUFFIX} / *{OPTIM_STATES_SUFFIX} files; expected a global_stepN/ folder "
        f"written by engine.save_checkpoint, or the folder holding it and {LATEST_NAME!r}"
    )


def _optim_files(folder: str) -> tuple[str, dict[int, str]]:
    """The optimizer-state files by data-parallel rank, and their name prefix (``""`` or ``"bf16_"``)."""
    by_rank: dict[int, str] = {}
    prefixes = set()
    for name in sorted(os.listdir(folder)):
        if not name.endswith(OPTIM_STATES_SUFFIX):
            continue
        match = _OPTIM_FILE.match(name)
        if match is None:
            raise UnsupportedCheckpoint(
                f"{os.path.join(folder, name)}: unexpected optimizer-state file name; supported: "
                "[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt (no MoE expert files)"
            )
        bf16, rank, mp_rank = match.group(1) or "", int(match.group(2)), int(match.group(3))
        if mp_rank != 0:
            raise UnsupportedCheckpoint(
                f"{os.path.join(folder, name)}: model-parallel rank {mp_rank}; supported: only mp_rank_00 "
                "(no tensor or pipeline parallelism)"
            )
        prefixes.add(bf16)
        by_rank[rank] = os.path.join(folder, name)
    if not by_rank:
        raise NotADeepSpeedCheckpoint(
            f"{folder}: no *{OPTIM_STATES_SUFFIX} files; a ZeRO checkpoint keeps its fp32 master weights "
            "there (was it saved without optimizer states, or is it not a ZeRO checkpoint?)"
        )
    if len(prefixes) > 1:
        raise IncompleteCheckpoint(f"{folder}: holds both bf16_ and plain optimizer-state files (two runs mixed)")
    return prefixes.pop(), by_rank


def _check_ranks(folder: str, found: dict[int, str], world_size: int, expected_name: str) -> None:
    """Every rank 0..W-1 has its file and no other rank does."""
    missing = [os.path.join(folder, expected_name.format(rank=r)) for r in range(world_size) if r not in found]
    if missing:
        raise IncompleteCheckpoint(
            f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f": the checkpoint's world size is {world_size}, so ranks 0..{world_size - 1} each save one"
        )
    extra = sorted(r for r in found if r >= world_size)
    if extra:
        raise IncompleteCheckpoint(
            f"{found[extra[0]]}: rank {extra[0]} in a checkpoint of world size {world_size} (allowed ranks: "
            f"0..{world_size - 1}); files of an older, larger run are mixed in"
        )


def _stage_and_world_size(path: str, state: dict) -> tuple[int, int]:
    """(ZeRO stage, data-parallel world size) from rank 0's optimizer states."""
    if "zero_stage" in state:
        stage = _enum_value(state["zero_stage"])
    elif _STAGE12_KEY in state:
        stage = 1  # DeepSpeed's BF16_Optimizer (bf16 with fp32 grad accumulation at stage 1)
    else:
        raise NotADeepSpeedCheckpoint(f"{path}: no 'zero_stage' in its optimizer states; not a ZeRO checkpoint")
    if stage not in (1, 2, 3):
        raise UnsupportedCheckpoint(f"{path}: zero_stage = {stage!r}; supported: 1, 2, 3")
    count = state.get("partition_count")
    counts = list(count) if isinstance(count, (list, tuple)) else [count]
    if not counts or not all(isinstance(c, int) and c >= 1 for c in counts):
        raise NotADeepSpeedCheckpoint(f"{path}: partition_count = {count!r}; expected a positive int (or list)")
    if len(set(counts)) > 1:
        raise UnsupportedCheckpoint(
            f"{path}: partition_count = {count!r} differs between param groups (MoE expert groups); "
            "supported: one data-parallel world size"
        )
    return int(stage), counts[0]


# ---- where each param's master values sit ------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    """One trainable param: its group, its start in its flat sequence, its numel and shape."""

    group: int
    start: int
    numel: int
    shape: torch.Size


def _pieces(tensors: list[torch.Tensor], start: int, end: int) -> list[torch.Tensor]:
    """Slices of ``tensors`` covering elements [start, end) of their concatenation (no copy)."""
    out, base = [], 0
    for t in tensors:
        lo, hi = max(start, base), min(end, base + t.numel())
        if lo < hi:
            out.append(t[lo - base : hi - base])
        base += t.numel()
    return out


def _join(pieces: list[torch.Tensor], numel: int, shape: torch.Size) -> torch.Tensor:
    """The first ``numel`` elements of the pieces, copied into a new fp32 tensor of ``shape``."""
    if numel == 0:
        return torch.empty(shape, dtype=torch.float32)
    flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
    return flat[:numel].to(torch.float32).view(shape)


class DeepSpeedCheckpoint:
    """A DeepSpeed checkpoint folder: `global_stepN/` with `*_model_states.pt` and
    `*_optim_states.pt` (or the parent folder holding a `latest` file naming the tag).

    ``names()`` are the trainable params in the model's state-dict naming, in DeepSpeed's packing
    order; ``load_fp32(name)`` assembles one param's fp32 master from the rank files;
    ``extra_tensors()`` gives the persistent buffers and frozen params. Tied weights are listed
    once (see the module docstring and :meth:`tied_aliases`). Construction opens every rank file,
    memory-mapped (only its pickled index is read), keeps it open, and checks that the files are
    complete and agree on the layout; ``load_fp32`` then reads only the bytes of that one param.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = resolve_folder(path)
        self._files: dict[str, dict] = {}
        prefix, optim_by_rank = _optim_files(self.folder)
        first = os.path.join(self.folder, f"{prefix}zero_pp_rank_0_mp_rank_00{OPTIM_STATES_SUFFIX}")
        if 0 not in optim_by_rank:
            raise IncompleteCheckpoint(f"{first} is missing: it holds the checkpoint's stage and world size")
        self.stage, self.world_size = _stage_and_world_size(first, self._optimizer_state(first))
        pattern = f"{prefix}zero_pp_rank_{{rank}}_mp_rank_00{OPTIM_STATES_SUFFIX}"
        _check_ranks(self.folder, optim_by_rank, self.world_size, pattern)
        self._optim_paths = [optim_by_rank[r] for r in range(self.world_size)]
        self._model_paths = self._model_state_paths()
        model = self._model_states(0)
        self._param_shapes = self._read_param_shapes(model)
        self._aliases = dict(model.get("shared_params") or {})
        self._placements = self._place()

    # -- public API -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Trainable param names, as in the model's state dict, in DeepSpeed's packing order."""
        return list(self._placements)

    def shape(self, name: str) -> torch.Size:
        """The full shape of trainable param ``name``."""
        return self._placement(name).shape

    def load_fp32(self, name: str) -> torch.Tensor:
        """The full fp32 master value of ``name``, assembled from every rank's partition (a new tensor)."""
        place = self._placement(name)
        if self.stage == 3:
            per_rank = -(-place.numel // self.world_size)
            pieces = [p for r in range(self.world_size)
                      for p in _pieces(self._masters(r), place.start, place.start + per_rank)]
        else:
            ranks = [self._masters(r)[place.group] for r in range(self.world_size)]
            pieces = _pieces(ranks, place.start, place.start + place.numel)
        return _join(pieces, place.numel, place.shape)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Persistent buffers and frozen params (state-dict entries that are not trainable params
        nor tied aliases), as saved: buffers and stage-1 frozen params in the engine's dtype (bf16
        for a bf16 run), stage 2-3 frozen params assembled from ``frozen_param_fragments``."""
        model = self._model_states(0)
        module: dict[str, torch.Tensor] = model.get("module") or {}
        frozen = dict(model.get("frozen_param_shapes") or {})
        buffers = set(model.get("buffer_names") or [])
        out: dict[str, torch.Tensor] = {}
        for name, value in module.items():
            if name in self._placements or name in self._aliases:
                continue
            if name in frozen:
                out[name] = self._frozen(name, torch.Size(frozen[name]))
            elif self.stage == 3 and name not in buffers and value.numel() == 0:
                raise UnsupportedCheckpoint(
                    f"{self._model_paths[0]}: {name!r} is a partitioned placeholder with no saved value "
                    "(not in param_shapes, frozen_param_shapes or buffer_names)"
                )
            else:
                out[name] = value.detach().clone()
        for name, shape in frozen.items():
            if name not in out and name not in self._aliases:
                out[name] = self._frozen(name, torch.Size(shape))
        return out

    def tied_aliases(self) -> dict[str, str]:
        """``{alias: name}`` for tied weights: ``alias`` shares the param listed as ``name``."""
        return dict(self._aliases)

    # -- reading the files ------------------------------------------------------------------------

    def _load(self, path: str) -> dict:
        if path not in self._files:
            self._files[path] = load_torch_file(path)
        return self._files[path]

    def _optimizer_state(self, path: str) -> dict:
        state = self._load(path).get("optimizer_state_dict")
        if not isinstance(state, dict):
            raise NotADeepSpeedCheckpoint(f"{path}: no 'optimizer_state_dict'; not a DeepSpeed optimizer file")
        return state

    def _optim_states(self, rank: int) -> dict:
        return self._optimizer_state(self._optim_paths[rank])

    def _model_states(self, rank: int) -> dict:
        return self._load(self._model_paths[rank])

    def _model_state_paths(self) -> list[str]:
        """Rank 0's model-state file (stages 1-2), or every rank's (stage 3, checked complete)."""
        if self.stage < 3:
            path = os.path.join(self.folder, f"mp_rank_00{MODEL_STATES_SUFFIX}")
            if not os.path.isfile(path):
                raise IncompleteCheckpoint(
                    f"{path} is missing: a stage-{self.stage} checkpoint keeps its model states there"
                )
            return [path]
        pattern = re.compile(rf"^zero_pp_rank_(\d+)_mp_rank_00{re.escape(MODEL_STATES_SUFFIX)}$")
        found = {int(m.group(1)): os.path.join(self.folder, m.group(0))
                 for m in map(pattern.match, os.listdir(self.folder)) if m}
        expected = f"zero_pp_rank_{{rank}}_mp_rank_00{MODEL_STATES_SUFFIX}"
        _check_ranks(self.folder, found, self.world_size, expected)
        return [found[r] for r in range(self.world_size)]

    def _read_param_shapes(self, model: dict) -> list[dict[str, torch.Size]]:
        shapes = model.get("param_shapes")
        if not isinstance(shapes, (list, tuple)) or not all(isinstance(g, dict) for g in shapes):
            raise NotADeepSpeedCheckpoint(
                f"{self._model_paths[0]}: param_shapes = {type(shapes).__name__}; expected a list of "
                "{name: shape} per param group (saved by a ZeRO engine with an optimizer)"
            )
        return [{name: torch.Size(shape) for name, shape in group.items()} for group in shapes]

    def _masters(self, rank: int) -> list[torch.Tensor]:
        """Rank ``rank``'s flat fp32 master tensors, one per (sub-)group (memory-mapped)."""
        key = _STAGE3_KEY if self.stage == 3 else _STAGE12_KEY
        groups = self._optim_states(rank).get(key)
        if not isinstance(groups, (list, tuple)) or not all(torch.is_tensor(t) for t in groups):
            raise NotADeepSpeedCheckpoint(
                f"{self._optim_paths[rank]}: no {key!r} tensors; expected the fp32 master partitions of a "
                f"stage-{self.stage} checkpoint"
            )
        return [t.reshape(-1) for t in groups]

    # -- the layout -------------------------------------------------------------------------------

    def _place(self) -> dict[str, _Placement]:
        return self._place_stage3() if self.stage == 3 else self._place_stage12()

    def _place_stage12(self) -> dict[str, _Placement]:
        """Params sit back to back in their group's flat buffer (plus alignment paddings, if any)."""
        paddings = self._optim_states(0).get("param_alignment_paddings")
        group_counts = {len(self._masters(r)) for r in range(self.world_size)}
        if group_counts != {len(self._param_shapes)}:
            raise NotADeepSpeedCheckpoint(
                f"{self._optim_paths[0]}: {sorted(group_counts)} fp32 groups per rank, but "
                f"{self._model_paths[0]} lists {len(self._param_shapes)} param groups in param_shapes"
            )
        out: dict[str, _Placement] = {}
        for g, shapes in enumerate(self._param_shapes):
            group_pad = list(paddings[g]) if paddings is not None else [0] * len(shapes)
            if len(group_pad) != len(shapes):
                raise NotADeepSpeedCheckpoint(
                    f"{self._optim_paths[0]}: param_alignment_paddings[{g}] has {len(group_pad)} entries for "
                    f"{len(shapes)} params"
                )
            offset = 0
            for (name, shape), pad in zip(shapes.items(), group_pad):
                out[name] = _Placement(g, offset, math.prod(shape), shape)
                offset += math.prod(shape) + int(pad)
            saved = sum(self._masters(r)[g].numel() for r in range(self.world_size))
            self._check_consumed(f"param group {g}", offset, saved, 2 * self.world_size)
        return out

    def _place_stage3(self) -> dict[str, _Placement]:
        """Each rank holds ceil(numel / W) elements of every param, back to back across its groups."""
        out: dict[str, _Placement] = {}
        offset = 0
        for g, shapes in enumerate(self._param_shapes):
            for name, shape in shapes.items():
                out[name] = _Placement(g, offset, math.prod(shape), shape)
                offset += -(-math.prod(shape) // self.world_size)
        for r in range(self.world_size):
            self._check_consumed(f"rank {r}'s flat groups", offset, sum(t.numel() for t in self._masters(r)), 1, r)
        return out

    def _check_consumed(self, what: str, used: int, saved: int, align: int, rank: int = 0) -> None:
        """The layout must account for the saved elements, up to end padding (zero_to_fp32's check)."""
        if -(-used // align) != -(-saved // align):
            raise NotADeepSpeedCheckpoint(
                f"{self._optim_paths[rank]}: {what} holds {saved} fp32 elements, but the params in "
                f"{self._model_paths[0]}'s param_shapes need {used}; the files are of different runs or "
                "of a layout this reader does not know"
            )

    def _placement(self, name: str) -> _Placement:
        if name not in self._placements:
            hint = f"; it is tied to {self._aliases[name]!r}" if name in self._aliases else ""
            raise KeyError(f"{name!r} is not a trainable param of {self.folder}{hint}")
        return self._placements[name]

    def _frozen(self, name: str, shape: torch.Size) -> torch.Tensor:
        """A frozen param: whole in rank 0's fragments (stage 2), or one piece per rank (stage 3)."""
        ranks = range(self.world_size) if self.stage == 3 else [0]
        fragments = [self._frozen_fragment(r, name) for r in ranks]
        numel = math.prod(shape)
        flat = torch.cat(fragments) if len(fragments) > 1 else fragments[0].clone()
        if flat.numel() < numel:
            raise NotADeepSpeedCheckpoint(
                f"{self._model_paths[0]}: frozen param {name!r} of shape {tuple(shape)} has only "
                f"{flat.numel()} saved elements over {len(fragments)} rank file(s)"
            )
        return flat[:numel].view(shape).clone()

    def _frozen_fragment(self, rank: int, name: str) -> torch.Tensor:
        fragments = self._model_states(rank).get("frozen_param_fragments") or {}
        if not torch.is_tensor(fragments.get(name)):
            raise NotADeepSpeedCheckpoint(
                f"{self._model_paths[rank]}: frozen param {name!r} is in frozen_param_shapes but has no "
                "tensor in frozen_param_fragments"
            )
        return fragments[name].reshape(-1)
