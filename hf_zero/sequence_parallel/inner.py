"""The attention Ulysses runs between its two all-to-alls, and what it hands it: the one place that decides.

| inner (the model's implementation before Ulysses) | function | over the whole sequence it gets |
|---|---|---|
| ``sdpa`` | transformers' sdpa | no mask: causal by ``is_causal`` (a sliding-window layer: in chunks, [Note: sliding windows inside Ulysses]) |
| ``eager`` | the model's own ``eager_attention_forward`` | a full-length additive causal mask built here (a sliding-window layer: in chunks) |
| a ``sparse_attention`` block's (``hf_zero_sparse_attention_<n>``) | its ``flex.SparseAttention`` | the whole sequence's padding (or None) and the share of the heads this rank holds |

[Note: sparse attention inside Ulysses]
With ``sparse_attention`` and ``sequence_parallel_size`` P both on, Ulysses wraps the sparse attention
function: after the first all-to-all a rank holds the whole sequence (L tokens) of H / P of the heads,
so the sparse function runs as it does unsplit, its layout and block mask built for L tokens, the
causal rule on whole-sequence positions (the tokens are in order). Two things differ from an unsplit
call, and this module supplies them:

- which heads: ``all_to_all`` sends chunk j of the heads to the group's rank j, so rank r holds query
  heads ``r * H / P .. (r + 1) * H / P - 1`` (with KV heads repeated P / KV times, its one KV copy is
  the one those query heads use: ulysses.py). A layout that differs per head
  (``different_layout_per_head``: fixed's global patterns, bigbird's and variable's random blocks,
  all drawn over the model's H heads) is built for H heads and this rank takes its rows
  (``flex.HeadShare``);
- the padding: the model builds its mask from this rank's slice. Under the Ulysses key the mask
  function hands every rank its slice's ``[batch, L / P]`` padding whenever the model was given an
  ``attention_mask`` (not None where the slice has no padding, as the unsplit mask function does: the
  ranks must agree on whether to gather), and the slices are all-gathered into the whole sequence's.
  The Trainer's split batches carry no mask (right padding only, checked by batch_split.py: a
  causal model's real tokens never attend to it); a model called directly with one gets it applied.

[Note: sliding windows inside Ulysses]
A sliding-window layer (Mistral's layers, the ``sliding_attention`` layers of Qwen2/3) passes its window
as the ``sliding_window`` keyword; unsplit, the window is in the mask the model builds, which Ulysses
drops (it was built for the slice). When the window is shorter than the whole sequence, sdpa or eager
runs in chunks of ``window`` queries (``sliding_window``): the chunk of queries ``[s, e)`` attends to the
keys ``[s - window + 1, e)`` under the mask of transformers' ``sliding_window_overlay`` (query i sees key
j when i - window < j <= i), boolean for sdpa, additive for eager. Exact, and no ``[L, L]`` mask: each
chunk's is ``window x (2 window - 1)``. A sparse attention function refuses a sliding window itself
(flex.py).

The order is fixed: sparse first, then Ulysses, whose ``enable`` wraps the attention the model runs.
The Trainer applies the block before sequence parallelism's setup (hf_zero/trainer/seams.py). On a
model already under Ulysses ``flex.apply`` refuses (the sparse_attention package imports nothing of
sequence parallelism), naming the way to do it in place: ``ulysses.wrap(model, flex.register(config))``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from hf_zero.sequence_parallel.layout import KEY, SpLayout
from hf_zero.sparse_attention import flex

INNER = ("sdpa", "eager")
"""The model implementations Ulysses wraps, beside the sparse attention functions (``is_sparse``)."""


def is_sparse(name: object) -> bool:
    """A sparse_attention block's registered attention (flex.register)."""
    return isinstance(name, str) and name.startswith(flex.PREFIX)


def wraps(name: object) -> bool:
    """Whether Ulysses can run ``name`` between its all-to-alls (the table above)."""
    return name in INNER or is_sparse(name)


def function(name: str, module: torch.nn.Module):
    """The attention function of ``name`` for ``module``'s model."""
    if name == "sdpa" or is_sparse(name):
        return AttentionInterface._global_mapping[name]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)  # the model's own
    if eager is None:
        raise NotImplementedError(f"{KEY} with eager attention: {type(module).__module__} has no "
                                  "eager_attention_forward; use attn_implementation 'sdpa'")
    return eager


def mask_function(name: str):
    """The mask function registered beside Ulysses' key for ``name``."""
    return slice_padding if is_sparse(name) else ALL_MASK_ATTENTION_FUNCTIONS[name]


def slice_padding(*, kv_length: int, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """``flex.padding_mask``'s checks, and the ``[batch, kv_length]`` bool padding whenever there is an
    ``attention_mask``, all real or not (the Note above)."""
    flex.padding_mask(kv_length=kv_length, attention_mask=attention_mask, **kwargs)
    return None if attention_mask is None else attention_mask[:, :kv_length].bool()


def unsplit(name: str, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask for an unsplit call (eval mode): a sparse function's padding None when all real."""
    if is_sparse(name) and mask is not None and bool(mask.all()):
        return None
    return mask


def whole_sequence(name: str, query: torch.Tensor, mask: torch.Tensor | None,
                   layout: SpLayout) -> tuple[torch.Tensor | None, dict]:
    """The mask and extra keywords for the inner attention over the whole sequence, given ``query``
    after the all-to-all (``[b, H / P, L, d]``) and the mask the model built for this rank's slice."""
    if name == "sdpa":
        return None, {}
    if name == "eager":
        return causal_mask(query.shape[2], query), {}
    heads = query.shape[1]
    return _gathered(mask, layout), {"head_share": flex.HeadShare(layout.rank * heads, layout.size * heads)}


def windowed(name: str, window: int | None, length: int) -> bool:
    """Whether the call runs as ``sliding_window`` (sdpa or eager, a window shorter than the sequence)."""
    return name in INNER and window is not None and window < length


def sliding_window(inner, name: str, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   *, sliding_window: int, **kwargs: Any) -> torch.Tensor:
    """``inner`` over the whole sequence of ``query`` ([b, h, L, d]) limited to the window, in chunks of
    ``sliding_window`` queries ([Note: sliding windows inside Ulysses]); ``[b, L, h, d]``."""
    window, length, outs = sliding_window, query.shape[2], []
    for start in range(0, length, window):
        end, first = min(start + window, length), max(0, start - window + 1)
        rows = torch.arange(start, end, device=query.device)[:, None]
        cols = torch.arange(first, end, device=query.device)[None, :]
        mask = ((cols <= rows) & (cols > rows - window))[None, None]
        if name == "eager":
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
        out, _ = inner(module, query[:, :, start:end], key[:, :, first:end], value[:, :, first:end], mask,
                       sliding_window=window, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1)


def causal_mask(length: int, like: torch.Tensor) -> torch.Tensor:
    """The additive causal mask eager attention adds to its scores, for the whole sequence."""
    mask = torch.full((length, length), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
    return mask.triu(1)[None, None]


def _gathered(local: torch.Tensor | None, layout: SpLayout) -> torch.Tensor | None:
    """The group's ``[b, L / P]`` paddings (``slice_padding``), in rank order: ``[b, L]``; None when all real."""
    if local is None:
        return None
    parts = [torch.empty_like(local, dtype=torch.uint8) for _ in range(layout.size)]
    dist.all_gather(parts, local.to(torch.uint8).contiguous(), group=layout.group)
    whole = torch.cat(parts, dim=1).bool()
    return None if bool(whole.all()) else whole


__all__ = ["INNER", "causal_mask", "function", "is_sparse", "mask_function", "slice_padding", "sliding_window",
           "unsplit", "whole_sequence", "windowed", "wraps"]
