"""The one (pp, dp, tp) mesh of a Trainer with tensor parallelism, pipeline stages or both.

Built once at ``Trainer.__init__``, by the first of the two setups that needs it (pipeline.py, then
tensor_parallel.py: the stage's layers are kept first, then its planned layers split over tp), from
``pipeline.stages`` and ``tensor_parallel.autotp_size`` (hf_zero/tensor_parallel/mesh.py lays it out).
Both read it from here, and ZeRO's engine shards over its dp group: the ranks of one stage holding the
same tp part.
"""

from __future__ import annotations

import weakref

from hf_zero.tensor_parallel.mesh import ParallelMesh, build_parallel_mesh

_BY_TRAINER: "weakref.WeakKeyDictionary[object, ParallelMesh]" = weakref.WeakKeyDictionary()


def sizes(config) -> tuple[int, int]:
    """(tp, pp) of a resolved config."""
    return config.tensor_parallel.autotp_size, config.pipeline.stages


def mesh_for(trainer, config) -> ParallelMesh:
    """The Trainer's mesh, built on first use (a collective: every rank calls it at ``Trainer.__init__``)."""
    mesh = _BY_TRAINER.get(trainer)
    if mesh is None:
        tp, pp = sizes(config)
        if tp == 1 and pp == 1:
            raise AssertionError("mesh_for: neither tensor parallelism nor pipeline stages are asked for")
        mesh = _BY_TRAINER[trainer] = build_parallel_mesh(trainer.args.device.type, tp=tp, pp=pp)
    return mesh


def of(trainer) -> ParallelMesh | None:
    return _BY_TRAINER.get(trainer)


def engine_group(trainer) -> dict:
    """The ZeroEngine's ``group`` keyword: the mesh's dp group under tp or pipeline stages, else nothing."""
    mesh = of(trainer)
    return {} if mesh is None else {"group": mesh.dp_group}
