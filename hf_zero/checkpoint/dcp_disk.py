"""A full disk during a ``torch.distributed.checkpoint`` save, reported as one clear error.

DCP writes each rank's file with ``torch.save``, whose zip writer turns ``ENOSPC`` into
``RuntimeError: unexpected pos ...`` (the ``OSError`` survives only as its ``__context__``);
DCP then pickles every rank's error to rank 0 and raises ``CheckpointException ranks:dict_keys(
[0, 1])`` with those messages on every rank. Pickling drops ``__context__``, so the cause can
only be recognized on the rank that hit it: ``FileSystemWriter`` does that, turning it into a
``DiskFullError`` (picklable) before DCP wraps it, and ``unwrap`` raises the one of the lowest
rank that hit it, in place of the ``CheckpointException``.
"""

from __future__ import annotations

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from hf_zero.checkpoint.atomic import DiskFullError, as_disk_full


class FileSystemWriter(dcp.FileSystemWriter):
    """DCP's writer, with a full disk raised as ``DiskFullError`` on the rank that hit it."""

    def write_data(self, plan, planner):
        try:
            return super().write_data(plan, planner)
        except Exception as error:
            full = as_disk_full(error, str(self.path), _plan_bytes(plan))
            if full is None:
                raise
            raise full from error

    def finish(self, metadata, results) -> None:
        try:
            super().finish(metadata, results)
        except Exception as error:
            full = as_disk_full(error, str(self.path), None)
            if full is None:
                raise
            raise full from error


def _plan_bytes(plan) -> int:
    """The tensor bytes this rank's plan writes (DCP adds a small header per tensor)."""
    total = 0
    for item in plan.items:
        if item.tensor_data is not None:
            numel = 1
            for size in item.tensor_data.size:
                numel *= size
            total += numel * item.tensor_data.properties.dtype.itemsize
    return total


def unwrap(error: BaseException) -> DiskFullError | None:
    """The ``DiskFullError`` of the lowest rank that hit one, inside a ``CheckpointException``
    (or ``error`` itself, outside a process group), else None."""
    if isinstance(error, CheckpointException):
        for rank in sorted(error.failures):
            inner = error.failures[rank][0]
            if isinstance(inner, DiskFullError):
                return inner
        return None
    return error if isinstance(error, DiskFullError) else None
