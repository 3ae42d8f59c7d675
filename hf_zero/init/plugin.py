"""``zero3_init_flag`` (on by default at stage 3): a script's own ``from_pretrained`` loads sharded
while hf_zero is active.

The seam (``seams.from_pretrained``, on ``PreTrainedModel.from_pretrained``, which the ``AutoModel*``
classes call with the concrete class) asks ``sharded_or_none`` first. It loads sharded only a call
it can serve exactly as transformers would, and leaves every other call to transformers with a
warning that says why, once per job for each checkpoint and reason: the model is then loaded whole
and sharded when the optimizer is created, as with the flag false.

Served: a local directory, or a hub id whose snapshot is in the local cache with the hub offline
(checkpoint_files.py), with safetensors or ``.bin`` weights giving every param of the model,
under its own name or through transformers' weight conversions (renamed keys, fused experts:
key_plan.py), and keyword arguments among ``dtype`` / ``torch_dtype``, ``config``,
``attn_implementation``, ``subfolder`` / ``revision`` / ``cache_dir`` / ``local_files_only`` /
``use_safetensors`` (read as transformers reads them) and the download arguments that do not
apply to local files. Not served: positional model args, ``device_map``, quantization (arguments
or a quantized checkpoint), ``state_dict``, ``variant``, adapters (a PEFT adapter directory),
checkpoints that leave params to initialize (a new head) or whose conversion cannot be planned
before reading, models whose declared weight ties ``tie_weights`` leaves undone on meta, ``.bin`` files in torch's legacy format, and anything else. A model served and then wrapped by PEFT is laid out anew for the
wrapper when the Trainer creates its optimizer (relayout.py).
"""

from __future__ import annotations

import json
import os
import warnings

from hf_zero.first_rank import is_first_rank
from hf_zero.init.checkpoint_files import NotServed, checkpoint_directory, find_files
from hf_zero.init.checkpoint_source import MissingParams

_SERVED = {"dtype", "torch_dtype", "config", "attn_implementation"}
_WHERE = ("subfolder", "revision", "cache_dir", "local_files_only", "use_safetensors")  # which files: passed on
# Arguments that only matter for downloads; local files ignore them.
_HUB_ONLY = {"force_download", "token", "proxies", "trust_remote_code", "_from_auto", "_from_pipeline",
             "_commit_hash", "adapter_kwargs"}
_WARNED: set[tuple[str, str]] = set()  # (checkpoint, reason) warned about in this process


def _wanted() -> bool:
    from hf_zero.trainer.session import active_config

    config = active_config()
    return config is not None and config.zero.stage == 3 and bool(config.zero.zero3_init_flag)


def why_not(path, args: tuple, kwargs: dict) -> str | None:
    """Why this ``from_pretrained`` call cannot load sharded, or None if it can."""
    if args:
        return "positional model arguments"
    unserved = sorted(k for k, v in kwargs.items() if k not in _SERVED | _HUB_ONLY | set(_WHERE) and v is not None)
    if unserved:
        return "keyword arguments " + ", ".join(unserved)
    try:
        directory = checkpoint_directory(path, **_where(kwargs, exclude="use_safetensors"))
        if os.path.isfile(os.path.join(directory, "adapter_config.json")):
            return "a PEFT adapter directory"
        find_files(directory, kwargs.get("use_safetensors"))
    except NotServed as e:
        return e.reason
    if _quantized(directory, kwargs.get("config")):
        return "a quantized checkpoint (quantization_config in its config)"
    return None


def _where(kwargs: dict, exclude: str = "") -> dict:
    return {k: kwargs[k] for k in _WHERE if k != exclude and kwargs.get(k) is not None}


def _quantized(path, config) -> bool:
    if config is not None:
        return getattr(config, "quantization_config", None) is not None
    try:
        with open(os.path.join(path, "config.json")) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return False  # no readable config.json: the load itself says so
    return isinstance(found, dict) and found.get("quantization_config") is not None


def sharded_or_none(cls, path, args: tuple, kwargs: dict):
    """The model loaded sharded, or None: the caller loads it whole (transformers' own)."""
    if not _wanted():
        return None
    reason = why_not(path, args, kwargs)
    if reason is None:
        from hf_zero.init.sharded_load import from_pretrained

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        extra = {"attn_implementation": kwargs["attn_implementation"]} if kwargs.get("attn_implementation") else {}
        try:
            return from_pretrained(os.fspath(path), dtype=dtype, model_class=cls, config=kwargs.get("config"),
                                   **_where(kwargs), **extra)
        except (MissingParams, NotServed) as e:  # found before any shard was made
            reason = e.reason
    _warn_once(path, reason)
    return None


def _warn_once(path, reason: str) -> None:
    if (str(path), reason) in _WARNED:
        return
    _WARNED.add((str(path), reason))
    if is_first_rank():  # every rank loads it: said once per job
        warnings.warn(f"zero_optimization.zero3_init_flag: {path} loads whole ({reason}); hf_zero shards it when "
                      "the optimizer is created (set zero3_init_flag false to load every model whole without "
                      "this warning)", UserWarning, stacklevel=4)
