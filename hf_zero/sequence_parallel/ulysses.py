"""Ulysses attention, registered through transformers' attention interface.

``enable(model, layout)`` switches a model from ``sdpa`` (or ``eager``, or a ``sparse_attention``
block's function) to ``hf_zero_ulysses_sdpa`` (``hf_zero_ulysses_eager``,
``hf_zero_ulysses_hf_zero_sparse_attention_<n>``), keys this module registers with
``AttentionInterface`` (and, for the masks the model builds, ``AttentionMaskInterface``, with the
mask function inner.py names). The model's code is untouched: its attention layers look the function
up by that key. ``wrap(model, name)`` changes the inner attention of a model already under Ulysses
(a sparse attention after ``enable``: ``wrap(model, flex.register(config))``).

While the attention module trains, each call holds this rank's slice of the sequence
(``[b, heads, s / P, d]``, rotary positions already applied from the full sequence's position ids):

1. all-to-all from sequence-sharded to head-sharded: ``[b, heads / P, s, d]`` (all_to_all.py);
2. the inner attention over the whole sequence, causal (inner.py decides which function and what it
   gets): sdpa with ``is_causal`` and no mask, eager with a full-length causal mask, the mask the model
   built for the local slice dropped (the batch splitter has checked that no padding mask is needed:
   batch_split.py); a sparse attention function with the group's padding gathered and the share of the
   heads this rank holds ([Note: sparse attention inside Ulysses] in inner.py); on a sliding-window
   layer (Mistral's, Qwen2/3's ``sliding_attention`` layers) sdpa or eager in query chunks, each under
   its band of the window ([Note: sliding windows inside Ulysses] in inner.py);
3. all-to-all back: ``[b, s / P, heads, d]``.

In eval mode (``Trainer.evaluate``, ``generate``; its batches are not split) the inner attention runs
as it would without hf_zero.

Grouped-query attention: KV heads divisible by P are split like query heads; when P is a multiple of
the KV heads, each KV head is first repeated P / KV times so every rank receives the one KV head its
query heads use (DeepSpeed's rule); anything else is refused (``check_heads``).
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from hf_zero.sequence_parallel import inner as I
from hf_zero.sequence_parallel.all_to_all import all_to_all
from hf_zero.sequence_parallel.inner import INNER
from hf_zero.sequence_parallel.layout import KEY, SpLayout

PREFIX = "hf_zero_ulysses_"

_ACTIVE: dict[str, SpLayout | None] = {"layout": None}  # this process's layout: one, as its process groups


def key_for(inner: str) -> str:
    return PREFIX + inner


def is_on(model) -> bool:
    """Whether ``model``'s attention runs through Ulysses."""
    current = model.config._attn_implementation
    return isinstance(current, str) and current.startswith(PREFIX)


def check_heads(config, size: int) -> None:
    """Refuse a model whose heads do not split over ``size`` ranks (module docstring)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    if not isinstance(heads, int):
        raise ValueError(f"{KEY} = {size}: the model's config has no num_attention_heads; Ulysses sequence "
                         "parallelism splits attention heads over the ranks of a group")
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % size:
        raise ValueError(f"{KEY} = {size}: the model's num_attention_heads = {heads} is not divisible by it "
                         f"(each rank computes attention for heads / {KEY} heads); use a divisor of {heads}")
    if kv % size and size % kv:
        raise ValueError(f"{KEY} = {size}: the model's num_key_value_heads = {kv} neither divides by it nor divides "
                         f"it (KV heads are split over the group, or repeated when {KEY} is a multiple of them); "
                         f"use a divisor or a multiple of {kv} that divides {heads}")


def enable(model, layout: SpLayout) -> None:
    """Run ``model``'s attention through Ulysses over ``layout``'s group while it trains."""
    config = model.config
    current = config._attn_implementation
    active = _ACTIVE["layout"]
    if active is not None and active is not layout:
        raise ValueError(f"{KEY}: this process already trains with {KEY} = {active.size}; one layout per process")
    if is_on(model):
        return
    if not I.wraps(current):
        raise NotImplementedError(f"{KEY} = {layout.size} with attn_implementation {current!r}: not built yet in "
                                  f"hf_zero; load the model with attn_implementation one of {list(INNER)} (a "
                                  "sparse_attention block's attention is wrapped too)")
    check_heads(config, layout.size)
    _ACTIVE["layout"] = layout
    wrap(model, current)


def wrap(model, inner: str) -> None:
    """Set ``model``'s attention to Ulysses around ``inner`` (an implementation inner.py wraps)."""
    if not I.wraps(inner):
        raise NotImplementedError(f"{KEY}: Ulysses around attention {inner!r}: not built yet in hf_zero; it wraps "
                                  f"{list(INNER)} and sparse_attention's")
    if key_for(inner) not in AttentionInterface._global_mapping:
        AttentionInterface.register(key_for(inner), _attention(inner))
        AttentionMaskInterface.register(key_for(inner), I.mask_function(inner))
    model.set_attn_implementation(key_for(inner))


def _attention(name: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        inner = I.function(name, module)
        layout = _ACTIVE["layout"]
        if layout is None or not module.training:
            return inner(module, query, key, value, I.unsplit(name, attention_mask), **kwargs)
        return _ulysses(inner, name, layout, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = key_for(name)
    return attention


def _ulysses(inner, name: str, layout: SpLayout, module, query, key, value, attention_mask, **kwargs):
    parts, group = layout.size, layout.group
    if key.shape[1] % parts:  # P a multiple of the KV heads (check_heads): one whole KV head per rank
        key = key.repeat_interleave(parts // key.shape[1], dim=1)
        value = value.repeat_interleave(parts // value.shape[1], dim=1)
    kwargs.pop("position_ids", None)  # this slice's; the inner attention sees the whole sequence, in order
    query, key, value = (all_to_all(t, 1, 2, group) for t in (query, key, value))  # [b, h / P, s, d]
    groups = query.shape[1] // key.shape[1]
    view = module if getattr(module, "num_key_value_groups", groups) == groups else _HeadGroups(module, groups)
    if I.windowed(name, kwargs.get("sliding_window"), query.shape[2]):  # a sliding-window layer (inner.py)
        out = I.sliding_window(inner, name, view, query, key, value, **kwargs)
    else:
        mask, extra = I.whole_sequence(name, query, attention_mask, layout)
        out, _ = inner(view, query, key, value, mask, **kwargs, **extra)  # [b, s, h / P, d]
    return all_to_all(out, 1, 2, group), None  # [b, s / P, h, d]; per-head weights of a shard: not returned


class _HeadGroups:
    """The attention module as the inner attention reads it, with the query heads per KV head of the
    heads this rank holds (only when KV heads were repeated: fewer query heads share each copy)."""

    def __init__(self, module, groups: int) -> None:
        self._module = module
        self.num_key_value_groups = groups

    def __getattr__(self, name):
        return getattr(self._module, name)
