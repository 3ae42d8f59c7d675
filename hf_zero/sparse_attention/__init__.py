"""DeepSpeed's sparse attention (the ``sparse_attention`` block) as FlexAttention block masks.

| file | what |
|---|---|
| hf_zero/config/sparse_attention.py | ``SparseAttentionConfig``: DeepSpeed's keys, defaults and checks for the modes dense, fixed, variable, bigbird, bslongformer (beside the other config blocks, so hf_zero.config imports no model code) |
| layouts.py | each mode's ``[heads, blocks, blocks]`` layout, built as DeepSpeed builds it |
| kernels.py | which FlexAttention kernel runs a block mask: the tile (64- or 128-token multiples), fixed kernel block sizes for 64-token tiles, the compile ([Note: tiles and kernel options]) |
| flex.py | the layout as a FlexAttention ``BlockMask`` (plus the causal rule and padding), the attention function registered through transformers' ``AttentionInterface``, and ``apply(model, config)`` that sets ``config._attn_implementation`` to it ([Note: sparse attention through the attention interface]) |
| training.py | the Trainer seam's call: the block applied to the Trainer's model, what it cannot do refused |

Opt-in: it changes what the model computes, by design (docs/long-sequences.md, "Sparse attention").
"""

from hf_zero.config.sparse_attention import SparseAttentionConfig

__all__ = ["SparseAttentionConfig"]
