"""The Trainer's side of sparse attention: the ``sparse_attention`` block applied to the Trainer's model.

Called by the ``Trainer.__init__`` seam (hf_zero/trainer/seams.py) for every stage, before the engine
is built and before any step; what it cannot do is refused there.
"""

from __future__ import annotations

from typing import Any

from hf_zero.config.sparse_attention import KEY
from hf_zero.sparse_attention.flex import apply


def setup(trainer: Any, config: Any) -> str | None:
    """Make the Trainer's model attend through ``config.sparse_attention``'s layout (flex.apply); the
    registered attention name, or None when the config has no ``sparse_attention`` block."""
    sparse = config.sparse_attention
    if sparse is None:
        return None
    where = f" in {config.source}" if config.source else ""
    if (config.sequence_parallel_size or 1) > 1:
        raise NotImplementedError(f"{KEY}{where} with sequence_parallel_size = {config.sequence_parallel_size}: "
                                  "sparse attention inside Ulysses attention is not built yet in hf_zero; leave one "
                                  "of them out")
    if sparse.different_layout_per_head and config.tensor_parallel.autotp_size > 1:
        raise NotImplementedError(f"{KEY}.different_layout_per_head = true{where} with tensor_parallel.autotp_size "
                                  f"= {config.tensor_parallel.autotp_size}: each rank holds a slice of the heads, and "
                                  "per-head layouts over a slice are not built yet in hf_zero; use one layout for "
                                  "all heads (different_layout_per_head false)")
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper: its model
    return apply(base, sparse)


__all__ = ["setup"]
