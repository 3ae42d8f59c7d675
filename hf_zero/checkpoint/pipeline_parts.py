"""One description of the whole model in a checkpoint of a model split over pipeline stages.

[Note: pipeline parts]
Under pipeline stages (hf_zero/pipeline) each stage's engine holds only that stage's params, at
their original names (``model.layers.5.mlp.up_proj.weight`` on the stage that holds layer 5). The
stored tensors need nothing more: each is keyed by its name, in its full shape
(``sharded.py``), so every stage writes its own in parallel and a run with another split (or none)
reads them by name. The description (``META_NAME``) is the one file a single rank writes, and rank
0's engine knows only stage 0's params; so every rank sends its engine's part of the description
and rank 0 writes their union, in global rank order (stage-outer: stage 0's params first):

    W = 2, stages = 2 (4 layers):
        rank 0 (stage 0): layout [embed_tokens, layers.0.*, layers.1.*]    2 optimizer groups
        rank 1 (stage 1): layout [layers.2.*, layers.3.*, norm, lm_head]   2 optimizer groups
        META_NAME:        layout [embed_tokens, layers.0.* ... norm, lm_head], each group's
                          params the union of the two ranks' (settings: rank 0's, the same)

Loading, each engine adopts its own slice of the saved layout (the saved order of its own params):
at the same split that is the layout it saved (the same reduction order, bit for bit); at another
stage count, or without stages, the params' saved order. The check that a checkpoint belongs to the
model compares the whole model's trainable params with the description's: under pipeline stages the
union of every rank's (``union_shapes``, a collective). Under tensor parallelism every rank's engine
holds every name, so the union is each rank's own.
"""

from __future__ import annotations

import torch.distributed as dist

from hf_zero.checkpoint.errors import CheckpointError


def split_over_world(engine) -> bool:
    """The world's ranks hold more than one engine group (tensor or pipeline parallelism): the
    description is the union of the groups' parts."""
    return dist.is_available() and dist.is_initialized() and engine.ctx.world_size < dist.get_world_size()


def union_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every rank's trainable params (name -> full shape) together; a collective over the world."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, shapes)
    out: dict[str, tuple[int, ...]] = {}
    for rank, part in enumerate(parts):
        for name, shape in part.items():
            if out.setdefault(name, tuple(shape)) != tuple(shape):
                raise AssertionError(f"{name} has shape {out[name]} on one rank and {tuple(shape)} on rank {rank}")
    return out


def union_description(part: dict) -> dict | None:
    """Rank 0: the union of every rank's ``part`` of the description (keys ``layout``, ``params``,
    ``extra``, ``param_groups``, ``python_scalars``); other ranks: None. A collective over the world."""
    parts: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0)
    if parts is None:
        return None
    return merge(parts)


def merge(parts: list[dict]) -> dict:
    """The union of description parts, in their order (see the Note)."""
    first = parts[0]
    layout = list(dict.fromkeys(n for p in parts for n in p["layout"]))
    params: dict[str, list[int]] = {}
    for p in parts:
        params.update(p["params"])
    counts = {len(p["param_groups"]) for p in parts}
    if len(counts) != 1:
        raise CheckpointError(f"the ranks' optimizers have {sorted(counts)} param groups: a pipeline checkpoint needs "
                              "the same param groups on every stage (the Trainer's optimizer has them)")
    groups = []
    for index, settings in enumerate(first["param_groups"]):
        names = dict.fromkeys(n for p in parts for n in p["param_groups"][index]["params"])
        groups.append({**settings, "params": list(names)})
    scalars: dict[str, str] = {}
    for p in parts:
        scalars.update(p["python_scalars"])
    extra = sorted({n for p in parts for n in p["extra"]})
    return {"layout": layout, "params": params, "extra": extra, "param_groups": groups, "python_scalars": scalars}


def own_slice(layout: list[str], own: set[str]) -> list[str]:
    """The saved ``layout`` restricted to this engine's params (their saved order)."""
    return [n for n in layout if n in own]
