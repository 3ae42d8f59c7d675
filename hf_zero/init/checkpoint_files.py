"""Which weight files ``from_pretrained(path, ...)`` reads, picked as transformers picks them.

- ``path`` a local directory (joined with ``subfolder`` when given): its ``model.safetensors``,
  else ``model.safetensors.index.json`` and the files it names, else (unless
  ``use_safetensors=True``) ``pytorch_model.bin``, else ``pytorch_model.bin.index.json``; with
  ``use_safetensors=False`` only the ``.bin`` ones (transformers' ``_get_resolved_checkpoint_files``).
- ``path`` a hub id (``org/name``) with the hub offline (``HF_HUB_OFFLINE=1`` or
  ``local_files_only=True``): the snapshot of ``revision`` (default ``main``) in the local
  Hugging Face cache (``cache_dir``, default ``HF_HUB_CACHE``), read as a local directory; every
  file it needs must be there. Online, transformers asks the hub for the newest revision first,
  which hf_zero does not, so an online hub id loads whole (``NotServed``).

``NotServed`` says why a call is left to transformers (the caller loads whole with that reason).
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


class NotServed(ValueError):
    """This load is not one hf_zero's sharded load serves; ``reason`` says why (in a warning)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CheckpointFiles(NamedTuple):
    directory: str
    format: str  # "safetensors" or "bin"
    paths: tuple[str, ...]  # every weight file, in the index's order of first use


def checkpoint_directory(path, *, subfolder: str = "", revision: str | None = None, cache_dir=None,
                         local_files_only: bool = False) -> str:
    """The local directory ``from_pretrained(path, ...)`` reads (``NotServed`` when there is none)."""
    if not isinstance(path, (str, os.PathLike)):
        raise NotServed(f"not a path or hub id ({type(path).__name__})")
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.join(path, subfolder) if subfolder else path
    if not _is_hub_id(path):
        raise NotServed("not a local directory or a hub id")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not (local_files_only or constants.HF_HUB_OFFLINE):
        raise NotServed("a hub id with the hub online (transformers asks the hub for its newest revision; set "
                        "HF_HUB_OFFLINE=1 or pass local_files_only=True to load the cached snapshot sharded)")
    try:
        snapshot = snapshot_download(path, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise NotServed(f"a hub id not in the local cache at revision {revision or 'main'}") from None
    return os.path.join(snapshot, subfolder) if subfolder else snapshot


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def find_files(directory: str, use_safetensors: bool | None = None) -> CheckpointFiles:
    """The weight files of ``directory`` that transformers would read (``NotServed`` if none)."""
    candidates = []
    if use_safetensors is not False:
        candidates += [("safetensors", SAFE_SINGLE, False), ("safetensors", SAFE_INDEX, True)]
    if not use_safetensors:
        candidates += [("bin", BIN_SINGLE, False), ("bin", BIN_INDEX, True)]
    for fmt, name, is_index in candidates:
        found = os.path.join(directory, name)
        if not os.path.isfile(found):
            continue
        paths = _indexed(found) if is_index else [found]
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise NotServed(f"{name} names {os.path.basename(absent[0])}, which is not there")
        return CheckpointFiles(directory, fmt, tuple(paths))
    wanted = " or ".join(name for _, name, _ in candidates)
    raise NotServed(f"no weight files ({wanted}) in it")


def _indexed(index: str) -> list[str]:
    with open(index) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' object; not a checkpoint index")
    directory = os.path.dirname(index)
    return [os.path.join(directory, name) for name in dict.fromkeys(weight_map.values())]
