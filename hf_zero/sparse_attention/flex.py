"""A sparse-attention layout as a FlexAttention ``BlockMask``, and the attention function that uses it.

[Note: sparse attention through the attention interface]
:func:`apply` turns a model's attention sparse without touching torch or the model's code:

1. it registers a :class:`SparseAttention` for the config under a name of its own
   (``hf_zero_sparse_attention_<n>``) with ``transformers.AttentionInterface.register``, and
   :func:`padding_mask` under the same name with ``AttentionMaskInterface.register``;
2. it calls ``model.set_attn_implementation(name)``, which sets ``config._attn_implementation`` on the
   model's config (and its sub-configs). Every attention layer of a model that uses the attention
   interface (Llama, Mistral, Qwen2/3, ...) looks its function up by that name at each call, and
   ``create_causal_mask`` calls the mask function registered under it.

With Ulysses sequence parallelism (``sequence_parallel_size`` > 1, turned on after this) Ulysses wraps
this function: the model's attention becomes ``hf_zero_ulysses_<name>``, and each rank
calls the function over the whole sequence for its share of the heads (``HeadShare``: a per-head
layout takes those heads' rows) with the whole sequence's padding ([Note: sparse attention inside
Ulysses] in hf_zero/sequence_parallel/inner.py).

What a layer then computes, for a sequence of L tokens (``B`` = the layout's block):

- the layout ``[heads, ceil(L / B), ceil(L / B)]`` of the config (layouts.py), built once per L;
- token ``q`` attends to token ``k`` iff ``layout[h, q // B, k // B]``, and ``q >= k`` when the
  attention module is causal (``module.is_causal``, true for decoder LMs: the layout may be
  bidirectional, a causal model never sees the future), and ``k`` is not padding;
- on CUDA (and on CPU without gradients) as ``flex_attention`` with a ``BlockMask`` read straight off
  the layout: tiles of ``lcm(B, 64)`` tokens (``lcm(B, 128)`` for heads wider than bf16 head dim 128:
  kernels.py, [Note: tiles and kernel options], which also fixes the kernel's block sizes for tiles
  that are not multiples of 128); tiles with no layout block skipped, tiles wholly inside the layout
  (and below the diagonal when causal, with no padding in the batch) computed without the mask, the
  rest masked token by token;
- on CPU with gradients as ``scaled_dot_product_attention`` with the same mask expanded to
  ``[L, L]`` booleans, because FlexAttention has no CPU backward in torch 2.13 (eager or compiled:
  "FlexAttention does not support backward on CPU"). Same result, dense cost.

Refused with a message: key and query lengths that differ (decoding with a cache; sparse attention
is for training: set the model back with ``model.set_attn_implementation("sdpa")`` to generate),
attention dropout, sliding-window layers, packed sequences and any mask beyond causal + padding.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from hf_zero.config.sparse_attention import KEY, SparseAttentionConfig
from hf_zero.sparse_attention.kernels import attend, row_bytes, tile_for
from hf_zero.sparse_attention.layouts import make_layout, num_blocks

PREFIX = "hf_zero_sparse_attention_"

_NAMES: dict[SparseAttentionConfig, str] = {}  # each distinct config's registered name


def expand_layout(layout: torch.Tensor, block: int, seq_len: int) -> torch.Tensor:
    """``[H, n, n]`` block layout -> ``[H, seq_len, seq_len]`` token booleans (blocks past ``seq_len`` cut)."""
    dense = layout.bool().repeat_interleave(block, dim=-1).repeat_interleave(block, dim=-2)
    return dense[:, :seq_len, :seq_len]


def dense_mask(layout: torch.Tensor, block: int, seq_len: int, *, causal: bool,
               padding: torch.Tensor | None = None) -> torch.Tensor:
    """The token mask ``[batch or 1, H, L, L]`` (True: attend) that the block mask stands for."""
    mask = expand_layout(layout, block, seq_len)[None]
    if causal:
        mask = mask & torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).tril()
    if padding is not None:
        mask = mask & padding[:, None, None, :seq_len].bool()
    return mask


def block_mask(layout: torch.Tensor, block: int, seq_len: int, *, causal: bool,
               padding: torch.Tensor | None = None, tile: int | None = None) -> BlockMask:
    """The FlexAttention ``BlockMask`` of ``dense_mask`` (same arguments), built from the layout's blocks
    without evaluating the mask over all ``L x L`` pairs (module docstring), in tiles of ``lcm(block,
    tile)`` tokens; ``tile`` None: ``kernels.tile_for(block)``, the tile for heads of up to
    ``kernels.ROW_BYTES`` a row (bf16 head dim 128)."""
    t = math.lcm(block, tile_for(block) if tile is None else tile)
    per, tiles = t // block, -(-seq_len // t)
    heads, n = layout.shape[0], layout.shape[-1]
    padded = torch.zeros(heads, tiles * per, tiles * per, dtype=torch.bool, device=layout.device)
    padded[:, :n, :n] = layout.bool()
    grid = padded.view(heads, tiles, per, tiles, per)
    touched, whole = grid.any(dim=4).any(dim=2), grid.all(dim=4).all(dim=2)  # [H, tiles, tiles]
    if causal:
        ones = torch.ones(tiles, tiles, dtype=torch.bool, device=layout.device)
        touched, whole = touched & ones.tril(), whole & ones.tril(-1)
    if padding is not None:
        whole = torch.zeros_like(whole)  # every tile checks the padding
    partial = touched & ~whole
    kv_num, kv_idx = _indices(partial)
    full_num, full_idx = _indices(whole)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=t,
                                    mask_mod=_mask_mod(padded, block, causal, padding), seq_lengths=(seq_len, seq_len))


def _indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query tile: how many KV tiles, and their indices first (ascending), as ``[1, H, ...]`` int32."""
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True)
    return tiles.sum(-1).to(torch.int32)[None], order.to(torch.int32)[None].contiguous()


def _mask_mod(layout: torch.Tensor, block: int, causal: bool, padding: torch.Tensor | None):
    per_head = layout.shape[0] > 1

    def mask_mod(b, h, q, k):
        keep = layout[h if per_head else 0, q // block, k // block]
        if causal:
            keep = keep & (q >= k)
        if padding is not None:
            keep = keep & padding[b, k]
        return keep

    return mask_mod


def _needs_dense(*tensors: torch.Tensor) -> bool:
    """FlexAttention has no CPU backward (module docstring)."""
    return tensors[0].device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class HeadShare(NamedTuple):
    """Heads ``first .. first + n - 1`` of the model's ``total`` attention heads (n: the query's heads)."""

    first: int
    total: int


class SparseAttention:
    """One config's attention function for transformers' attention interface (module docstring)."""

    def __init__(self, config: SparseAttentionConfig) -> None:
        self.config = config
        self._layouts: dict[tuple, torch.Tensor] = {}
        self._masks: dict[tuple, BlockMask] = {}
        self._padded: tuple | None = None  # (the padding mask object, key, BlockMask) of the last forward

    def layout(self, heads: int, seq_len: int, device: torch.device,
               share: HeadShare | None = None) -> torch.Tensor:
        """This config's layout for ``seq_len`` tokens, ``[heads or 1, n, n]`` bool on ``device``: with
        ``share``, the rows of heads ``share.first .. share.first + heads - 1`` of the layout of
        ``share.total`` heads ([Note: sparse attention inside Ulysses])."""
        share = HeadShare(0, heads) if share is None else share
        if share.first < 0 or share.first + heads > share.total:
            raise ValueError(f"{KEY}: heads {share.first} .. {share.first + heads - 1} are not heads of {share.total}")
        if not self.config.different_layout_per_head:
            heads, share = 1, HeadShare(0, 1)
        key = (heads, share, seq_len, str(device))
        if key not in self._layouts:
            padded_len = num_blocks(self.config, seq_len) * self.config.block
            rows = make_layout(self.config, share.total, padded_len)[share.first:share.first + heads]
            self._layouts[key] = rows.bool().to(device)
        return self._layouts[key]

    def block_mask(self, query: torch.Tensor, value: torch.Tensor, causal: bool,
                   padding: torch.Tensor | None, share: HeadShare | None = None) -> BlockMask:
        """The block mask for ``query`` (its heads, which of the model's heads they are, length and
        device) in the tile its heads take (kernels.tile_for), cached per shape; with padding, once per
        forward."""
        heads, seq_len, device = query.shape[1], query.shape[2], query.device
        tile = tile_for(self.config.block, row_bytes(query, value))
        key = (heads, share, seq_len, str(device), causal, tile)
        if padding is None:
            if key not in self._masks:
                self._masks[key] = block_mask(self.layout(heads, seq_len, device, share), self.config.block, seq_len,
                                              causal=causal, tile=tile)
            return self._masks[key]
        if self._padded is None or self._padded[0] is not padding or self._padded[1] != key:  # once per forward
            mask = block_mask(self.layout(heads, seq_len, device, share), self.config.block, seq_len, causal=causal,
                              padding=padding, tile=tile)
            self._padded = (padding, key, mask)
        return self._padded[2]

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 head_share: HeadShare | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """``head_share``: which of the model's heads ``query``'s are, when they are not all of them
        (Ulysses: this rank's share after its all-to-all); None: all, in order."""
        heads, seq_len = query.shape[1], query.shape[2]
        padding = self._check(module, query, key, attention_mask, dropout, kwargs)
        causal = bool(getattr(module, "is_causal", True))
        gqa = key.shape[1] != heads
        if _needs_dense(query, key, value):
            layout = self.layout(heads, seq_len, query.device, head_share)
            mask = dense_mask(layout, self.config.block, seq_len, causal=causal, padding=padding)
            empty = ~mask.any(dim=-1, keepdim=True)  # rows with nothing to attend to give 0, as FlexAttention's
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask | empty, scale=scaling,
                                                 enable_gqa=gqa).masked_fill(empty, 0.0)
        else:
            mask = self.block_mask(query, value, causal, padding, head_share)
            if query.device.type == "cpu":  # no gradient asked for (_needs_dense), but CPU flex refuses requires_grad
                query, key, value = query.detach(), key.detach(), value.detach()
            out = attend(query, key, value, mask, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None

    def _check(self, module, query, key, attention_mask, dropout, kwargs) -> torch.Tensor | None:
        name = type(module).__name__
        if key.shape[2] != query.shape[2]:
            raise NotImplementedError(f"{KEY}: {name} got {query.shape[2]} queries for {key.shape[2]} keys (decoding "
                                      "with a cache); sparse attention is built for full sequences only. To generate, "
                                      "switch the model back first: model.set_attn_implementation('sdpa')")
        if dropout:
            raise ValueError(f"{KEY}: {name} asks for attention dropout {dropout}; FlexAttention has none. Set the "
                             "model config's attention_dropout to 0, or leave sparse_attention out")
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError(f"{KEY}: {name} is a sliding-window layer (window {kwargs['sliding_window']}); "
                                      "sparse attention over it is not built yet in hf_zero")
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
            raise NotImplementedError(f"{KEY}: {name} got a {attention_mask.dim()}-D {attention_mask.dtype} "
                                      "attention mask; sparse attention takes the model's own mask (causal + "
                                      "padding) only, not a prepared or custom 4-D mask")
        return attention_mask


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
                 mask_function: Any = None, attention_mask: torch.Tensor | None = None,
                 allow_is_causal_skip: bool = True, **kwargs: Any) -> torch.Tensor | None:
    """The mask function registered beside :class:`SparseAttention`: what ``create_causal_mask`` hands
    every layer. None when no token is padding (one host read per forward, as transformers' own sdpa
    mask makes), else the ``[batch, kv_length]`` bool padding mask; the layout and the causal rule are
    the attention function's."""
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
            and q_length == kv_length):
        raise NotImplementedError(f"{KEY}: a mask for {q_length} queries at offset {q_offset} over {kv_length} keys "
                                  "(decoding with a cache); sparse attention is built for full sequences only. To "
                                  "generate, switch the model back first: model.set_attn_implementation('sdpa')")
    if not allow_is_causal_skip:
        raise NotImplementedError(f"{KEY}: the model's mask is more than causal + padding (packed sequences, a "
                                  "sliding window or an extra mask function); not built yet in hf_zero")
    if attention_mask is None:
        return None
    padding = attention_mask[:, :kv_length].bool()
    return None if bool(padding.all()) else padding


def register(config: SparseAttentionConfig) -> str:
    """Register ``config``'s attention and mask functions (once per distinct config); their name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if config not in _NAMES:
        name = f"{PREFIX}{len(_NAMES)}"
        AttentionInterface.register(name, SparseAttention(config))
        AttentionMaskInterface.register(name, padding_mask)
        _NAMES[config] = name
    return _NAMES[config]


def apply(model: torch.nn.Module, config: SparseAttentionConfig) -> str:
    """Make ``model``'s attention ``config``'s sparse attention (the Note above); the registered name."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        raise NotImplementedError(f"{KEY}: {type(model).__name__} does not take its attention from transformers' "
                                  "attention interface, so hf_zero cannot make it sparse; use a model that does "
                                  "(Llama, Mistral, Qwen2/3, ...) or leave sparse_attention out")
    current = model.config._attn_implementation
    if isinstance(current, str) and current.startswith("hf_zero_") and not current.startswith(PREFIX):
        raise NotImplementedError(f"{KEY}: the model's attention is already {current!r} (sequence parallelism's "
                                  "Ulysses): make it sparse first, then turn sequence parallelism on (it wraps the "
                                  "sparse attention; the Trainer does it in this order), or set the inner attention "
                                  "in place: hf_zero.sequence_parallel.ulysses.wrap(model, flex.register(config))")
    name = register(config)
    model.set_attn_implementation(name)
    return name


__all__ = ["PREFIX", "HeadShare", "SparseAttention", "apply", "block_mask", "dense_mask", "expand_layout",
           "padding_mask", "register"]
