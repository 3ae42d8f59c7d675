"""DeepSpeed's sparse attention (the ``sparse_attention`` block) as FlexAttention block masks.

| file | what |
|---|---|
| config.py | ``SparseAttentionConfig``: DeepSpeed's keys, defaults and checks for the modes dense, fixed, variable, bigbird, bslongformer |
| layouts.py | each mode's ``[heads, blocks, blocks]`` layout, built as DeepSpeed builds it |
| flex.py | the layout as a FlexAttention ``BlockMask`` (plus the causal rule and padding), the attention function registered through transformers' ``AttentionInterface``, and ``apply(model, config)`` that sets ``config._attn_implementation`` to it ([Note: sparse attention through the attention interface]) |

Opt-in: it changes what the model computes, by design. The Trainer seam applies it when the config has
the block (docs/long-sequences.md, "Sparse attention"). This package's ``__init__`` imports only the
config, so hf_zero.config can import it without importing transformers.
"""

from hf_zero.sparse_attention.config import SparseAttentionConfig

__all__ = ["SparseAttentionConfig"]
