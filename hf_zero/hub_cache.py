"""A model named by hub id (``meta-llama/Llama-3.1-8B``) read from the local Hugging Face cache.

``hf-zero estimate`` and ``hf-zero doctor --model`` take a config.json, a model directory, or a
hub id whose config.json is already in the cache (``HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``, laid out as ``models--ORG--NAME/refs/main`` naming the snapshot
``models--ORG--NAME/snapshots/<commit>/config.json``). Nothing is downloaded: a hub id that is not
in the cache is refused, saying so and how to fetch it.
"""

from __future__ import annotations

import os

WHAT = "MODEL_CONFIG"


def _is_hub_id(name: str) -> bool:
    """A valid repo id (``name`` or ``org/name``) that does not end in .json (that is a file)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.endswith(".json"):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def local_model_config(name: str, *, cache_dir: str | None = None) -> str:
    """``name`` itself when it exists on disk (or is no hub id: the caller reports the missing
    path); else the cached config.json of hub id ``name`` at its ``main`` revision.

    ``cache_dir``: the hub cache; None reads huggingface_hub's (``HF_HUB_CACHE`` / ``HF_HOME``, as
    set when it was imported). ValueError naming ``name`` and the cache when it is not there."""
    if os.path.exists(name) or not _is_hub_id(name):
        return name
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
    cached = try_to_load_from_cache(name, "config.json", cache_dir=cache)
    if isinstance(cached, str):
        return cached
    folder = os.path.join(cache, repo_folder_name(repo_id=name, repo_type="model"))
    found = "has no config.json for" if os.path.isdir(folder) else "does not hold"
    raise ValueError(f"{WHAT} {name!r} is not a local path, and the local Hugging Face cache ({cache}) {found} "
                     f"the hub model {name!r} (revision main); nothing is downloaded: fetch it first "
                     f"(hf download {name} config.json), or give a config.json or a model directory")

