"""The error every checkpoint reader raises for a checkpoint that cannot be used.

Its own module so that the readers (``sharded.py``, ``safe_reader.py``, ``digests.py``) share it
without importing each other; ``sharded.CheckpointError`` is the same class."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: names the file and what is wrong with it."""
