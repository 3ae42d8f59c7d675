"""The Trainer's side of sparse attention: the ``sparse_attention`` block applied to the Trainer's model.

Called by the ``Trainer.__init__`` seam (hf_zero/trainer/seams.py) for every stage, before the engine
is built and before any step, and before sequence parallelism's setup, which then wraps the sparse
function in Ulysses attention ([Note: sparse attention inside Ulysses], hf_zero/sequence_parallel/inner.py).
The combination it cannot run (per-head layouts with tensor parallelism) is a row of
hf_zero/config/unsupported.py, refused before this is reached; what only the model can tell (a model
outside the attention interface) ``flex.apply`` refuses.
"""

from __future__ import annotations

from typing import Any

from hf_zero.sparse_attention.flex import apply


def setup(trainer: Any, config: Any) -> str | None:
    """Make the Trainer's model attend through ``config.sparse_attention``'s layout (flex.apply); the
    registered attention name, or None when the config has no ``sparse_attention`` block."""
    sparse = config.sparse_attention
    if sparse is None:
        return None
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper: its model
    return apply(base, sparse)


__all__ = ["setup"]
