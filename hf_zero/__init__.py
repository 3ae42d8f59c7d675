"""hf_zero: ZeRO sharding and offload for transformers.Trainer."""

import importlib.metadata as _metadata

UNKNOWN_VERSION = "0+unknown"
"""``__version__`` when the hf-zero distribution is not installed (a bare source tree on
``PYTHONPATH``): a valid PEP 440 version that sorts below every release."""

try:
    __version__ = _metadata.version("hf-zero")
except _metadata.PackageNotFoundError:
    __version__ = UNKNOWN_VERSION
