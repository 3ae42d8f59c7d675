"""Reading checkpoints without running code from them.

[Note: nothing is unpickled from a checkpoint]
A pickle can call any importable function while it loads (``os.system`` through ``__reduce__``),
so a checkpoint file that is unpickled freely runs whatever its writer put there, on every rank.
Every file a resume or ``hf-zero consolidate`` reads goes through one of three doors:

- DCP's ``.metadata`` (a plain pickle of torch's metadata dataclasses): ``read_dcp_metadata``,
  an ``Unpickler`` whose ``find_class`` returns only the classes in ``_ALLOWED`` (traced from a
  real save: the dataclasses of ``torch.distributed.checkpoint.metadata``, DCP's ``_StorageInfo``,
  ``torch.Size``, torch dtypes and layouts, and the ``pathlib`` path DCP keeps as the checkpoint
  id). None of them does anything when built but hold its fields. Then every entry must be a
  tensor's: a ``BytesStorageMetadata`` entry would make DCP ``torch.load`` its bytes with
  ``weights_only=False`` (``DefaultLoadPlanner.load_bytes``), and hf_zero never writes one.
- DCP's ``.distcp`` items: DCP reads tensors with ``torch.load(weights_only=True)``;
  ``SafeReader`` names the file when that fails and ``SafeLoadPlanner`` refuses byte items.
- Any other torch file (DeepSpeed's ``*_states.pt``, the Trainer's ``scheduler.pt`` and
  ``rng_state*.pth``): ``torch.load(weights_only=True)`` (``torch_load``), which refuses every
  global outside torch's allow-list. ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` does not override an
  explicit ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.futures import Future
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo

from hf_zero.checkpoint.errors import CheckpointError

METADATA_NAME = ".metadata"  # DCP's own file name

# (module, name) -> object: what a DCP .metadata pickle may name ([Note: nothing is unpickled ...]).
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(dcp_metadata.__name__, c.__name__): c for c in (
        dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata,
        dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties, dcp_metadata.MetadataIndex,
        dcp_metadata.StorageMeta, dcp_metadata._MEM_FORMAT_ENCODING)},
    (_StorageInfo.__module__, "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # a name -> torch.layout lookup
    **{("pathlib", c.__name__): c for c in (pathlib.PosixPath, pathlib.PurePosixPath,
                                             pathlib.WindowsPath, pathlib.PureWindowsPath)},
    **{("torch", n): v for n, v in vars(torch).items() if isinstance(v, (torch.dtype, torch.layout, torch.memory_format))},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise CheckpointError(
                f"{self.path} names {module}.{name}, which is not one of torch's checkpoint metadata classes: "
                "refused without running it (a DCP .metadata written by torch.distributed.checkpoint names only "
                "its metadata dataclasses, torch.Size and torch dtypes)"
            )
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.path} holds a persistent id ({pid!r}): not a DCP .metadata file")


def read_dcp_metadata(file: str) -> dcp_metadata.Metadata:
    """DCP's metadata from ``file`` (a ``.metadata``), unpickled with the allow-list, checked to
    describe tensors only."""
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f, file).load()
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt pickle raises many kinds
        raise CheckpointError(f"{file} cannot be read ({type(error).__name__}: {error}): the checkpoint is "
                              "incomplete or corrupt") from error
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{file} holds a {type(metadata).__name__}, not DCP's Metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            raise CheckpointError(
                f"{file}: entry {key!r} is a {type(entry).__name__}; allowed: TensorStorageMetadata (hf_zero stores "
                "tensors only, and DCP would unpickle any other entry's bytes freely)"
            )
    return metadata


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with ``.metadata`` read through the allow-list, and a data file that
    fails to load named in the error."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        metadata = read_dcp_metadata(os.fspath(self._get_metadata_path(rank)))
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative, items in per_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except CheckpointError:
                raise
            except Exception as error:  # noqa: BLE001 - torch.load raises UnpicklingError, RuntimeError, ...
                raise CheckpointError(
                    f"{os.path.join(os.fspath(self.path), relative)} cannot be read ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}): the file is corrupt, or not what "
                    "torch.distributed.checkpoint wrote"
                ) from error
        done: Future = Future()
        done.set_result(None)
        return done


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner without its free unpickling of byte items (``read_dcp_metadata`` already
    refuses a checkpoint that has any; this holds for any other reader too)."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint item {read_item.dest_index.fqn!r} is stored as pickled bytes; hf_zero "
                              "reads tensors only and never unpickles checkpoint bytes")


def dcp_load(state: dict, path: str, *, no_dist: bool) -> None:
    """``dcp.load`` of ``state`` from the folder ``path`` through ``SafeReader`` and
    ``SafeLoadPlanner``; our own error comes out as itself, not inside DCP's wrapper."""
    try:
        dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as wrapped:
        for failure in wrapped.failures.values():
            error = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(error, CheckpointError):
                raise CheckpointError(str(error)) from wrapped
        raise


def torch_load(file: str, *, safe_globals: list | tuple = (), mmap: bool = False) -> Any:
    """``torch.load(file, weights_only=True)``, with a failure named by its file."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - UnpicklingError, RuntimeError, zipfile errors, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"{file} cannot be loaded as weights only ({type(error).__name__}: {first}); it "
                              "was refused without running anything from it") from error


def _numpy_globals() -> list:
    """What the Trainer's RNG state needs besides torch's allow-list (transformers'
    ``trainer_pt_utils.safe_globals``: numpy's array reconstruction and dtypes)."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def check_trainer_files(checkpoint: str) -> None:
    """The Trainer's pickled files of ``checkpoint`` (``scheduler.pt``, ``rng_state*.pth``) load
    weights only, as transformers and hf_zero load them on resume; refused here, before any
    training, with the file named (transformers' own error does not name it)."""
    scheduler = os.path.join(checkpoint, "scheduler.pt")
    if os.path.isfile(scheduler):
        torch_load(scheduler)
    for rng in sorted(glob.glob(os.path.join(glob.escape(checkpoint), "rng_state*.pth"))):
        torch_load(rng, safe_globals=_numpy_globals())
