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
- ``hf_zero_digest_rank{r}.json`` (JSON, each rank): the run id, the step, and the size and digest
  of every file rank r wrote; checked before any load ([Note: checkpoint digests], digests.py).

[Note: tensor-parallel parts]
Under tensor parallelism (hf_zero/tensor_parallel) the world is split into tp dp groups, one engine
each; tp rank t's engine holds part t of every split param (a slab along its split dim) and a copy
of every other param. Each part is stored as the boxes it covers in the param's *full* shape: a box
of this rank's flat range, shifted by t slabs along the split dim. So the stored tensors do not
depend on the split, and a checkpoint loads at any (dp, tp) (DCP reads whatever boxes a new part
covers), into a run without tp, and consolidates, as any other. Copies are written by tp rank 0's
group only; ``world_size`` is the whole world's (one digest manifest per global rank). Under
pipeline stages each stage's engine writes its own params and ``META_NAME`` describes the union of
every stage's ([Note: pipeline parts], pipeline_parts.py).

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
from hf_zero.checkpoint import digests, pipeline_parts, safe_reader
from hf_zero.checkpoint.boxes import Box, boxes
from hf_zero.checkpoint.errors import CheckpointError
from hf_zero.engine.shard_map import ParamShard, frozen_shard_map
from hf_zero.engine.stages import NotAvailableYet
from hf_zero.tensor_parallel.split import split_params

DIR_NAME = "hf_zero_sharded"
META_NAME = "hf_zero_meta.json"
FORMAT, VERSION = "hf_zero-sharded", 1


# ---- one param's part as DCP sees it ------------------------------------------------------------


class _Placement(NamedTuple):
    """Where this rank's engine state sits in the world ([Note: tensor-parallel parts])."""

    ranks: list[int]  # the engine's group ranks as global ranks (``ParamShard.chunks`` names group ranks)
    split: dict[str, tuple[int, int, int]]  # split param -> (split dim, tp rank, tp size)
    tp_rank: int
    # split param -> every rank's boxes of it in the full tensor, (offsets, sizes, "rank:R/device")
    everyone: dict[str, list[tuple[list[int], list[int], str]]]

    def full(self, entry: ParamShard) -> tuple[tuple[int, ...], int | None, int]:
        """The param's full shape, its split dim (None: not split) and this rank's part's offset on it."""
        if entry.name not in self.split:
            return entry.shape, None, 0
        dim, t, size = self.split[entry.name]
        shape = list(entry.shape)
        shape[dim] *= size
        return tuple(shape), dim, t * entry.shape[dim]

    def local_boxes(self, entry: ParamShard, start: int, end: int) -> list[tuple[list[int], Box]]:
        """The boxes of ``entry``'s flat range [start, end) of this rank's part: (offsets in the full
        tensor, the box in the part)."""
        _, dim, shift = self.full(entry)
        out = []
        for b in boxes(entry.shape, start, end):
            offsets = list(b.offsets)
            if dim is not None:
                offsets[dim] += shift
            out.append((offsets, b))
        return out

    def writes(self, entry: ParamShard) -> bool:
        """A copy (a param not split) is written by tp rank 0's group alone."""
        return entry.name in self.split or self.tp_rank == 0


def full_shapes(engine) -> dict[str, tuple[int, ...]]:
    """Each trainable param's full shape, tensor-parallel parts counted whole (what a checkpoint stores)."""
    place = _Placement([], split_params(engine.model), 0, {})
    return {e.name: place.full(e)[0] for e in engine.shard_map()}


def _placement(engine) -> _Placement:
    """A collective under tensor parallelism (every rank's boxes of the split params, all-gathered)."""
    split = split_params(engine.model)
    ranks = list(range(engine.ctx.world_size))
    if engine.ctx.group is not None and not _no_dist():  # a stage's or tp rank's dp group: its global ranks
        ranks = [dist.get_global_rank(engine.ctx.group, q) for q in ranks]
    if not split:
        return _Placement(ranks, {}, 0, {})
    place = _Placement(ranks, split, next(iter(split.values()))[1], {})
    device = engine.buffers[0].device
    where = f"rank:{dist.get_rank()}/{'cpu' if device.type == 'cpu' else str(device)}"
    mine = {e.name: [(offsets, list(b.sizes), where) for offsets, b in place.local_boxes(e, e.local.start, e.local.end)]
            for e in engine.shard_map() if e.name in split and e.local is not None}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    for part in gathered:
        for name, found in part.items():
            place.everyone.setdefault(name, []).extend(found)
    return place


def _dcp_value(flat: torch.Tensor, entry: ParamShard, place: _Placement) -> torch.Tensor | ShardedTensor:
    """``flat`` (this rank's elements of ``entry``, 1-D) as a tensor of the param's full shape:
    a plain view when this rank holds the whole param (not split), else a ShardedTensor of boxes."""
    shape = place.full(entry)[0]
    if entry.name not in place.split and entry.local.start == 0 and entry.local.end == math.prod(entry.shape):
        return flat.view(entry.shape)
    device = "cpu" if flat.device.type == "cpu" else str(flat.device)
    rank = dist.get_rank()
    local = [Shard(flat[b.start : b.start + b.numel].view(b.sizes),
                   ShardMetadata(offsets, list(b.sizes), f"rank:{rank}/{device}"))
             for offsets, b in place.local_boxes(entry, entry.local.start, entry.local.end)]
    if entry.name in place.split:  # the parts of every tp rank (the volume must be the full tensor's)
        everyone = [ShardMetadata(offsets, sizes, where) for offsets, sizes, where in place.everyone[entry.name]]
    else:
        everyone = [ShardMetadata(list(b.offsets), list(b.sizes), f"rank:{place.ranks[q]}/{device}")
                    for q, r in entry.chunks for b in boxes(entry.shape, r.start, r.end)]
    meta = ShardedTensorMetadata(everyone, torch.Size(shape), TensorProperties(dtype=flat.dtype))
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
    Trainer's run id and global step; without a run id, one is drawn for this save). It returns
    once *this* rank's files and manifest are written: a caller that reads the save on other ranks
    next waits for all of them first (the Trainer's save does, before its completion marker)."""
    path = os.path.join(directory, DIR_NAME)
    identity = digests.Identity(run_id or digests.draw_run_id(), step)
    place = _placement(engine)  # [Note: tensor-parallel parts]: manifests count the whole world
    rank, world_size = (0, 1) if _no_dist() else (dist.get_rank(), dist.get_world_size())
    digests.discard(path, rank, world_size)
    entries = engine.shard_map()
    state: dict[str, object] = {}
    py_scalars: dict[str, str] = {}
    for e in entries:
        if e.master is None or not place.writes(e):
            continue
        state[f"master/{e.name}"] = _dcp_value(e.master, e, place)
        piece_state = engine.optimizer.state.get(e.piece, {}) if e.piece is not None else {}
        for key, value in piece_state.items():
            name = f"optim/{e.name}/{key}"
            if torch.is_tensor(value) and value.dim() > 0:
                if value.numel() != e.master.numel():
                    raise CheckpointError(
                        f"optimizer state {key!r} of {e.name} has {value.numel()} elements, not one per param "
                        f"element ({e.master.numel()}): hf_zero's sharded checkpoints cannot store it"
                    )
                state[name] = _dcp_value(value.reshape(-1), e, place)
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
    frozen_split = sorted(set(extra) & set(place.split))
    if frozen_split:
        raise NotAvailableYet(f"sharded checkpoint save: {frozen_split[0]} is a frozen param of a tensor-parallel "
                              "split layer; checkpoints of frozen split params are not built yet")
    state.update({f"extra/{n}": t for n, t in extra.items()})
    if not hasattr(engine.model, "peft_config"):  # stage 3: frozen params are shards, stored as such
        for e in frozen_shard_map(engine):
            extra[e.name] = None
            if e.master is not None and place.writes(e):
                state[f"extra/{e.name}"] = _dcp_value(e.master, e, place)
    writer = _RecordingWriter(path)
    with _quiet_sharded_tensor():
        dcp.save(state, storage_writer=writer, no_dist=_no_dist())  # ENOSPC: DiskFullError
    files = writer.written()
    part = _description(engine, entries, extra, py_scalars, place)
    if pipeline_parts.split_over_world(engine):  # [Note: pipeline parts]: rank 0 writes every stage's
        part = pipeline_parts.union_description(part)
    if rank == 0:
        _write_meta(engine, path, part, place, world_size)
        files += [safe_reader.METADATA_NAME, META_NAME]
    digests.write_manifest(path, rank=rank, world_size=world_size, files=files, identity=identity)
    return path


def _description(engine, entries: list[ParamShard], extra: dict, py_scalars: dict, place: _Placement) -> dict:
    """This engine's part of ``META_NAME``: its params, layout and optimizer groups."""
    groups = []
    names = {id(e.piece): e.name for e in entries if e.piece is not None}
    for group in engine.optimizer.param_groups:
        settings = {k: _jsonable(v) for k, v in group.items() if k != "params"}
        settings["params"] = [names[id(p)] for p in group["params"] if id(p) in names]
        groups.append(settings)
    return {"layout": engine.layout(), "params": {e.name: list(place.full(e)[0]) for e in entries},
            "extra": sorted(extra), "param_groups": groups, "python_scalars": py_scalars}


def _write_meta(engine, path: str, part: dict, place: _Placement, world_size: int) -> None:
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "stage": engine.strategy.stage,
        "world_size": world_size,
        "layout": part["layout"],
        "params": part["params"],
        "param_dtype": str(engine.buffers[0].dtype).removeprefix("torch."),
        "extra": part["extra"],
        "peft": hasattr(engine.model, "peft_config"),
        "optimizer": {"class": type(engine.optimizer).__name__, "param_groups": part["param_groups"],
                      "python_scalars": part["python_scalars"]},
    }
    if place.split:  # informative: the stored tensors do not depend on it
        meta["tensor_parallel"] = next(iter(place.split.values()))[2]
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
    raise CheckpointError(
        f"{file} belongs to another model: trainable params of this model not in it {missing}, params in "
        f"it not in this model {extra}, shapes that differ {shapes}"
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
    shapes = full_shapes(engine)
    if pipeline_parts.split_over_world(engine):  # [Note: pipeline parts]: the whole model's params
        shapes = pipeline_parts.union_shapes(shapes)
    meta, metadata = check(directory, shapes)
    groups = meta["optimizer"]["param_groups"]
    if len(groups) != len(engine.optimizer.param_groups):
        raise CheckpointError(f"{os.path.join(path, META_NAME)}: the optimizer had {len(groups)} param groups, "
                              f"this run's has {len(engine.optimizer.param_groups)}")
    if not engine.strategy.shard_params:
        # Stages 1-2 pack in the saved order (a stage-3 save's is its unit order): the same
        # reduction order as the saved run, and no re-packing after the first backward, which
        # would drop the optimizer state restored here.
        engine.adopt_layout(pipeline_parts.own_slice(meta["layout"], {e.name for e in engine.shard_map()}))

    place = _placement(engine)  # after the re-packing: every rank's boxes as they are now
    entries = engine.shard_map()
    state: dict[str, object] = {}
    targets: dict[int, dict[str, torch.Tensor]] = {}
    keys = metadata.state_dict_metadata
    for e in entries:
        if e.master is None:
            continue
        state[f"master/{e.name}"] = _dcp_value(e.master, e, place)
        if e.piece is None:
            continue
        prefix = f"optim/{e.name}/"
        for key in (k for k in keys if k.startswith(prefix)):
            info = keys[key]
            if len(info.size) == 0:
                t = torch.zeros((), dtype=info.properties.dtype)
                state[key] = t
            else:
                t = torch.zeros(e.master.numel(), dtype=info.properties.dtype, device=e.master.device)
                state[key] = _dcp_value(t, e, place)
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
