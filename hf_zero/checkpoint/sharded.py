"""Sharded checkpoints of the engine's state, through ``torch.distributed.checkpoint`` (DCP).

Every rank writes only what it holds, in parallel, and a checkpoint loads at any world size and
stage: each param's fp32 master values and each per-element optimizer state (Adam's moments,
SGD's momentum, ...) are stored in the param's full shape, as the rectangular blocks that this
rank's flat range covers (``boxes.py``), so DCP reads back whatever blocks a new layout needs.

A checkpoint is one folder (``DIR_NAME``) holding DCP's files and ``META_NAME``:

- ``master/{param}``: fp32 master values, the param's full shape.
- ``optim/{param}/{key}``: optimizer state; per-element ones in the param's shape, scalars
  (Adam's ``step``) whole, the same on every rank.
- ``extra/{name}``: the model's frozen params and persistent buffers (what a consolidated
  checkpoint needs besides the trainable params), in their own dtype; frozen params sharded at
  stage 3 as the blocks each rank holds. Left out for PEFT models, whose frozen base is not part
  of the fine-tune. Never loaded on resume: frozen params come from the model's own weights.
- ``META_NAME`` (JSON, rank 0): format, stage, world size, the layout (param packing order), the
  params' shapes and dtype, and the optimizer's class and param-group settings.

[Note: parts of the world]
An engine may shard over a group smaller than the world: tensor parallelism splits the world into
tp disjoint dp groups, one per tp rank, each with its own (different) params under the same names.
Each group's state is then stored under its own key prefix ``part{r}/`` (r: the group's lowest global
rank, the tp rank), ``META_NAME`` records ``parts`` (each prefix's layout) and ``world_size`` is the
whole world's (one digest manifest per global rank). Such a checkpoint loads into the same parts
only (the same (dp, tp)); another split is refused as not built yet, and so is ``hf-zero consolidate``
of it (the checkpoint's model weights, written by ``save_model``, are the full ones).
- ``hf_zero_digest_rank{r}.json`` (JSON, each rank): the run id, the step, and the size and digest
  of every file rank r wrote; checked before any load ([Note: checkpoint digests], digests.py).

Nothing is unpickled from the folder: DCP's ``.metadata`` is read through an allow-list of torch's
metadata classes and its tensors weights-only ([Note: nothing is unpickled from a checkpoint],
safe_reader.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from hf_zero.checkpoint import dcp_disk
from hf_zero.checkpoint import digests, safe_reader
from hf_zero.checkpoint.boxes import boxes
from hf_zero.checkpoint.errors import CheckpointError
from hf_zero.engine.shard_map import ParamShard, frozen_shard_map
from hf_zero.engine.stages import NotAvailableYet

DIR_NAME = "hf_zero_sharded"
META_NAME = "hf_zero_meta.json"
FORMAT, VERSION = "hf_zero-sharded", 1


# ---- one param's part as DCP sees it ------------------------------------------------------------


def _dcp_value(flat: torch.Tensor, entry: ParamShard, ranks: list[int]) -> torch.Tensor | ShardedTensor:
    """``flat`` (this rank's elements of ``entry``, 1-D) as a tensor of the param's full shape:
    a plain view when this rank holds the whole param, else a ShardedTensor of boxes. ``ranks``:
    the global rank of each of the engine's group ranks (``entry.chunks`` names group ranks)."""
    numel = math.prod(entry.shape)
    if entry.local.start == 0 and entry.local.end == numel:
        return flat.view(entry.shape)
    device = "cpu" if flat.device.type == "cpu" else str(flat.device)
    rank = dist.get_rank()
    local = [Shard(flat[b.start : b.start + b.numel].view(b.sizes),
                   ShardMetadata(list(b.offsets), list(b.sizes), f"rank:{rank}/{device}"))
             for b in boxes(entry.shape, entry.local.start, entry.local.end)]
    everyone = [ShardMetadata(list(b.offsets), list(b.sizes), f"rank:{ranks[q]}/{device}")
                for q, r in entry.chunks for b in boxes(entry.shape, r.start, r.end)]
    meta = ShardedTensorMetadata(everyone, torch.Size(entry.shape), TensorProperties(dtype=flat.dtype))
    with _quiet_sharded_tensor():
        return ShardedTensor._init_from_local_shards_and_global_metadata(local, meta)


def _extra_tensors(model, trainable: set[str]) -> dict[str, torch.Tensor]:
    """Frozen params and persistent buffers, by state-dict name (none for PEFT models)."""
    if hasattr(model, "peft_config"):
        return {}
    seen = {id(p) for n, p in model.named_parameters() if n in trainable}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen and t.numel() > 0:  # 0 elements: a stage-3 shard (frozen_shard_map)
            out[name] = t.detach()
        seen.add(id(t))  # a tied alias (a frozen tied LM head) is stored once, as save_pretrained does
    return out


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if torch.is_tensor(value):
        return value.item()
    return value


def _like(saved, current):
    """A saved param-group setting back in the type the optimizer uses now."""
    if isinstance(current, tuple):
        return tuple(saved)
    if torch.is_tensor(current):
        return torch.tensor(saved, dtype=current.dtype, device=current.device)
    return saved


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


class _Part(NamedTuple):
    """Which part of the world an engine's state is ([Note: parts of the world])."""

    ranks: list[int]  # the engine's group ranks as global ranks
    prefix: str  # its keys' prefix: "" for an engine over the whole world
    parts: int  # how many such groups the world is split into


def _part(engine) -> _Part:
    if _no_dist() or engine.ctx.world_size == dist.get_world_size():
        return _Part(list(range(engine.ctx.world_size)), "", 1)
    ranks = [dist.get_global_rank(engine.ctx.group, q) for q in range(engine.ctx.world_size)]
    return _Part(ranks, f"part{min(ranks)}/", dist.get_world_size() // engine.ctx.world_size)


def _check_part(meta: dict, part: _Part, path: str) -> None:
    """The checkpoint was split into the same parts as this run (the same (dp, tp))."""
    saved = meta.get("parts", {"": None})
    if len(saved) != part.parts or part.prefix not in saved:
        raise NotAvailableYet(
            f"{os.path.join(path, META_NAME)} holds the state of {len(saved)} engine group(s) of the world "
            f"(tensor_parallel.autotp_size {len(saved)}), this run shards over {part.parts}: a resume at "
            "another tensor-parallel size is not built yet; resume with the autotp_size and world size it was "
            "saved at")


@contextlib.contextmanager
def _quiet_sharded_tensor():
    """ShardedTensor is how DCP takes arbitrary rectangular blocks of one tensor from each rank;
    its deprecation notice (pointing to DTensor, which cannot express them) is ours to see, not
    the user's at every save."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*DTensor instead.*ShardedTensor.*", category=FutureWarning)
        yield


# ---- save -----------------------------------------------------------------------------------------


class _RecordingWriter(dcp_disk.FileSystemWriter):
    """The writer, keeping the names of the data files this rank wrote (for its manifest)."""

    def write_data(self, plan, planner):
        self.results = super().write_data(plan, planner)
        return self.results

    def written(self) -> list[str]:
        return [r.storage_data.relative_path for r in self.results.value()] if hasattr(self, "results") else []


def save(engine, directory: str, *, run_id: str | None = None, step: int | None = None) -> str:
    """Every rank writes its part of ``engine``'s state under ``directory/DIR_NAME``, then its
    digest manifest; returns the folder. ``run_id``/``step`` name the save in the manifests (the
    Trainer's run id and global step; without a run id, one is drawn for this save)."""
    path = os.path.join(directory, DIR_NAME)
    identity = digests.Identity(run_id or digests.draw_run_id(), step)
    part = _part(engine)  # [Note: parts of the world]: manifests and the meta count the whole world
    rank, world_size = (0, 1) if _no_dist() else (dist.get_rank(), dist.get_world_size())
    digests.discard(path, rank, world_size)
    entries = engine.shard_map()
    state: dict[str, object] = {}
    py_scalars: dict[str, str] = {}
    for e in entries:
        if e.master is None:
            continue
        state[f"{part.prefix}master/{e.name}"] = _dcp_value(e.master, e, part.ranks)
        piece_state = engine.optimizer.state.get(e.piece, {}) if e.piece is not None else {}
        for key, value in piece_state.items():
            name = f"{part.prefix}optim/{e.name}/{key}"
            if torch.is_tensor(value) and value.dim() > 0:
                if value.numel() != e.master.numel():
                    raise CheckpointError(
                        f"optimizer state {key!r} of {e.name} has {value.numel()} elements, not one per param "
                        f"element ({e.master.numel()}): hf_zero's sharded checkpoints cannot store it"
                    )
                state[name] = _dcp_value(value.reshape(-1), e, part.ranks)
            elif torch.is_tensor(value):
                state[name] = value
            elif isinstance(value, (bool, int, float)):
                py_scalars[key] = type(value).__name__
                state[name] = torch.tensor(value)
            else:
                raise CheckpointError(f"optimizer state {key!r} of {e.name} is a {type(value).__name__}, "
                                      "which hf_zero's sharded checkpoints cannot store")
    names = {e.name for e in entries}
    extra = _extra_tensors(engine.model, names)
    state.update({f"{part.prefix}extra/{n}": t for n, t in extra.items()})
    if not hasattr(engine.model, "peft_config"):  # stage 3: frozen params are shards, stored as such
        for e in frozen_shard_map(engine):
            extra[e.name] = None
            if e.master is not None:
                state[f"{part.prefix}extra/{e.name}"] = _dcp_value(e.master, e, part.ranks)
    writer = _RecordingWriter(path)
    with _quiet_sharded_tensor():
        dcp.save(state, storage_writer=writer, no_dist=_no_dist())  # ENOSPC: DiskFullError
    files = writer.written()
    layouts = None
    if part.parts > 1:  # every group's packing order, for its own resume
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, (part.prefix, engine.layout()))
        layouts = dict(everyone)
    if rank == 0:
        _write_meta(engine, path, entries, extra, py_scalars, layouts, world_size)
        files += [safe_reader.METADATA_NAME, META_NAME]
    digests.write_manifest(path, rank=rank, world_size=world_size, files=files, identity=identity)
    return path


def _write_meta(engine, path: str, entries: list[ParamShard], extra: dict, py_scalars: dict,
                layouts: dict[str, list[str]] | None, world_size: int) -> None:
    groups = []
    names = {id(e.piece): e.name for e in entries if e.piece is not None}
    for group in engine.optimizer.param_groups:
        settings = {k: _jsonable(v) for k, v in group.items() if k != "params"}
        settings["params"] = [names[id(p)] for p in group["params"] if id(p) in names]
        groups.append(settings)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "stage": engine.strategy.stage,
        "world_size": world_size,
        "layout": engine.layout(),
        "params": {e.name: list(e.shape) for e in entries},
        "param_dtype": str(engine.buffers[0].dtype).removeprefix("torch."),
        "extra": sorted(extra),
        "peft": hasattr(engine.model, "peft_config"),
        "optimizer": {"class": type(engine.optimizer).__name__, "param_groups": groups, "python_scalars": py_scalars},
    }
    if layouts is not None:  # [Note: parts of the world]
        meta["parts"] = layouts
    tmp = os.path.join(path, META_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(path, META_NAME))


# ---- load -----------------------------------------------------------------------------------------


def read_meta(path: str) -> dict:
    """``META_NAME`` of the sharded checkpoint folder ``path``, checked."""
    file = os.path.join(path, META_NAME)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} is missing: {path} is not a complete hf_zero sharded checkpoint")
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file} cannot be read: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an hf_zero sharded checkpoint description (format {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{file} has format version {meta.get('version')}, this hf_zero reads version {VERSION}")
    return meta


def check_files(path: str, *, world_size: int | None = None, distributed: bool = False) -> dcp.Metadata:
    """DCP's metadata of ``path`` (read through the allow-list), after checking that every data
    file it names is there, whole, and what this save's digest manifests recorded (digests.py;
    ``world_size``: the saving run's, by default from ``META_NAME``; ``distributed``: every rank
    calls this, and each hashes a share)."""
    file = os.path.join(path, safe_reader.METADATA_NAME)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete or corrupt (the save was cut short)")
    metadata = safe_reader.read_dcp_metadata(file)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(needed.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete (a rank's part was not written)")
        if os.path.getsize(file) < size:
            raise CheckpointError(f"{file} is truncated: {os.path.getsize(file)} bytes, the checkpoint's "
                                  f"metadata needs at least {size}")
    if world_size is None:
        world_size = read_meta(path)["world_size"]
    digests.verify(path, sorted(needed) + [safe_reader.METADATA_NAME, META_NAME], world_size=world_size,
                   distributed=distributed)
    return metadata


def check_model(meta: dict, ours: dict[str, tuple[int, ...]], path: str) -> None:
    """The checkpoint belongs to this model: the same trainable params (``ours``: name -> shape)."""
    file = os.path.join(path, META_NAME)
    saved = {n: tuple(s) for n, s in meta["params"].items()}
    if saved == ours:
        return
    missing = sorted(set(ours) - set(saved))[:3]
    extra = sorted(set(saved) - set(ours))[:3]
    shapes = [f"{n}: checkpoint {saved[n]}, model {ours[n]}" for n in sorted(set(saved) & set(ours))
              if saved[n] != ours[n]][:3]
    split = (f"; it was saved by a tensor-parallel run in {len(meta['parts'])} parts, and a resume at another "
             "tensor-parallel size is not built yet") if "parts" in meta else ""
    raise CheckpointError(
        f"{file} belongs to another model: trainable params of this model not in it {missing}, params in "
        f"it not in this model {extra}, shapes that differ {shapes}{split}"
    )


def check(directory: str, shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dcp.Metadata]:
    """Refuse, before any work, a checkpoint in ``directory`` that a model with these trainable
    params (name -> shape) cannot resume from: missing, truncated or changed files (digests.py),
    another model, or a Trainer file that does not load weights only. Every rank calls it where
    ranks exist. Returns the checkpoint's meta and DCP's metadata."""
    path = os.path.join(directory, DIR_NAME)
    meta = read_meta(path)
    metadata = check_files(path, world_size=meta["world_size"], distributed=not _no_dist())
    check_model(meta, shapes, path)
    safe_reader.check_trainer_files(directory)
    return meta, metadata


@torch.no_grad()
def load(engine, directory: str) -> dict:
    """Restore ``engine``'s masters and optimizer state from ``directory/DIR_NAME``, written at any
    world size and stage; returns the checkpoint's meta. Checks come first: nothing is changed
    when the checkpoint is refused."""
    path = os.path.join(directory, DIR_NAME)
    part = _part(engine)
    _check_part(read_meta(path), part, path)  # first: another split also has other shapes
    meta, metadata = check(directory, {e.name: e.shape for e in engine.shard_map()})
    groups = meta["optimizer"]["param_groups"]
    if len(groups) != len(engine.optimizer.param_groups):
        raise CheckpointError(f"{os.path.join(path, META_NAME)}: the optimizer had {len(groups)} param groups, "
                              f"this run's has {len(engine.optimizer.param_groups)}")
    if not engine.strategy.shard_params:
        # Stages 1-2 pack in the saved order (a stage-3 save's is its unit order): the same
        # reduction order as the saved run, and no re-packing after the first backward, which
        # would drop the optimizer state restored here.
        engine.adopt_layout(meta["parts"][part.prefix] if part.prefix else meta["layout"])

    entries = engine.shard_map()
    state: dict[str, object] = {}
    targets: dict[int, dict[str, torch.Tensor]] = {}
    keys = metadata.state_dict_metadata
    for e in entries:
        if e.master is None:
            continue
        state[f"{part.prefix}master/{e.name}"] = _dcp_value(e.master, e, part.ranks)
        if e.piece is None:
            continue
        prefix = f"{part.prefix}optim/{e.name}/"
        for key in (k for k in keys if k.startswith(prefix)):
            info = keys[key]
            if len(info.size) == 0:
                t = torch.zeros((), dtype=info.properties.dtype)
                state[key] = t
            else:
                t = torch.zeros(e.master.numel(), dtype=info.properties.dtype, device=e.master.device)
                state[key] = _dcp_value(t, e, part.ranks)
            targets.setdefault(id(e.piece), {})[key[len(prefix):]] = t
    with _quiet_sharded_tensor():
        safe_reader.dcp_load(state, path, no_dist=_no_dist())

    py = meta["optimizer"]["python_scalars"]
    casts = {"bool": bool, "int": int, "float": float}
    current = engine.optimizer.state_dict()
    pieces = [p for g in engine.optimizer.param_groups for p in g["params"]]
    new_state = {}
    for index, piece in enumerate(pieces):
        if id(piece) in targets:
            new_state[index] = {k: (casts[py[k]](t.item()) if k in py else t) for k, t in targets[id(piece)].items()}
    new_groups = []
    for saved, group in zip(groups, current["param_groups"]):
        restored = dict(group)
        restored.update({k: _like(v, group[k]) for k, v in saved.items() if k != "params" and k in group})
        new_groups.append(restored)
    engine.optimizer.load_state_dict({"state": new_state, "param_groups": new_groups})
    engine.sync_params_from_masters()
    return meta
