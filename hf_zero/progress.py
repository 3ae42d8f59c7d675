"""Progress bars for hf_zero's long steps outside the training loop: the sharded load, the stage-3
save, ``hf-zero consolidate`` and NVMe set-up.

They are transformers' own bars (``transformers.utils.logging.tqdm``, the one behind its "Loading
weights" and "Writing model shards"), so the switches a user already has turn them off too:
``HF_HUB_DISABLE_PROGRESS_BARS=1`` or ``transformers.utils.logging.disable_progress_bar()``, and,
where a Trainer runs the step (its saves), ``TrainingArguments.disable_tqdm`` (``disable=``). As
in transformers, a bar is drawn whether or not stderr is a terminal. Only the job's rank 0 draws
one (``first_rank.py``): every rank does the same work, and one bar says how far the job is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hf_zero.first_rank import is_first_rank


def progress(iterable: Iterable | None = None, *, desc: str, total: float | None = None, unit: str = "it",
             disable: bool = False, **tqdm_kwargs: Any):
    """A tqdm bar over ``iterable`` (or one to ``update`` by hand, to ``total``), drawn on rank 0
    unless ``disable`` or Hugging Face's progress bars are off; a bar that is not drawn still
    iterates and takes ``update``/``close``. Extra keywords go to tqdm (``unit_scale``...)."""
    from transformers.utils import logging as hf_logging

    off = disable or not is_first_rank()
    if iterable is None:
        return hf_logging.tqdm(desc=desc, total=total, unit=unit, disable=off, **tqdm_kwargs)
    return hf_logging.tqdm(iterable, desc=desc, total=total, unit=unit, disable=off, **tqdm_kwargs)


def byte_bar(total: int, *, desc: str, disable: bool = False):
    """A bar counted in bytes (``update(n)`` with the bytes just done), shown as KiB/MiB/GiB."""
    return progress(desc=desc, total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=disable)
