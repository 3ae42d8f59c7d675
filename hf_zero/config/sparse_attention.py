"""DeepSpeed's ``sparse_attention`` block, key for key (what it does at run time: hf_zero/sparse_attention/).

The keys, their defaults and the checks are DeepSpeed's (``deepspeed/runtime/constants.py``,
``runtime/config.py`` ``get_sparse_*_config`` and the constructors of
``ops/sparse_attention/sparsity_config.py``). DeepSpeed's JSON reader passes each mode only some
keys; :data:`MODE_KEYS` lists them, and a key set to a non-default value in a mode that does not
read it is warned about (DeepSpeed drops it silently).

Two places where the JSON defaults differ from the layout classes' own, and hf_zero follows the JSON
(what a DeepSpeed config file gets):

- ``num_random_blocks`` is 0 for bigbird (``SPARSE_NUM_RANDOM_BLOCKS_DEFAULT``), although
  ``BigBirdSparsityConfig`` defaults to 1;
- DeepSpeed's reader does not pass ``attention`` to bigbird and bslongformer, so there it is always
  "bidirectional". hf_zero passes it to them too (both layout classes take it): a causal model gets the
  unidirectional layout it asks for. Left at its default, the layout is DeepSpeed's.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from hf_zero.config import checks
from hf_zero.config.fields import setting

KEY = "sparse_attention"
MODES = ("dense", "fixed", "variable", "bigbird", "bslongformer")
ATTENTION_TYPES = ("unidirectional", "bidirectional")

MODE_KEYS: dict[str, tuple[str, ...]] = {
    "dense": ("block",),
    "fixed": ("block", "different_layout_per_head", "num_local_blocks", "num_global_blocks", "attention",
              "horizontal_global_attention", "num_different_global_patterns"),
    "variable": ("block", "different_layout_per_head", "num_random_blocks", "local_window_blocks",
                 "global_block_indices", "global_block_end_indices", "attention", "horizontal_global_attention"),
    "bigbird": ("block", "different_layout_per_head", "num_random_blocks", "num_sliding_window_blocks",
                "num_global_blocks", "attention"),
    "bslongformer": ("block", "different_layout_per_head", "num_sliding_window_blocks", "global_block_indices",
                     "global_block_end_indices", "attention"),
}
"""The keys each mode reads (DeepSpeed's ``get_sparse_<mode>_config``; ``attention`` added for bigbird
and bslongformer, see the module docstring)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseAttentionConfig:
    """Block-sparse self-attention (DeepSpeed's ``sparse_attention`` block); the block's presence turns it
    on. hf_zero builds the layout as a FlexAttention block mask (hf_zero/sparse_attention/)."""

    mode: str = setting(
        "fixed",
        deepspeed="mode",
        doc="""Layout family: "fixed" (Sparse Transformers' local windows plus global columns), "variable"
        (fixed with listed window sizes, global blocks and random blocks), "bigbird" (random, sliding
        window, global), "bslongformer" (block-sparse Longformer: sliding window plus global blocks) or
        "dense" (every block; for comparison). Default "fixed" (DeepSpeed's).""",
    )
    block: int = setting(
        16,
        deepspeed="block",
        doc="""Tokens per layout block, each way: the layout says for every block x block tile of the
        attention matrix whether it is computed. Sequences are padded up to a multiple of it for the
        layout, as DeepSpeed's pad_to_block_size does. Default 16 (DeepSpeed's). On a GPU the layout is
        computed in tiles of lcm(block, 64) tokens (lcm(block, 128) for heads wider than bf16 head dim
        128), so a multiple of 64 (of 128 for those heads) wastes nothing; a smaller block has each tile
        it touches computed whole.""",
    )
    different_layout_per_head: bool = setting(
        False,
        deepspeed="different_layout_per_head",
        doc="""Give each attention head its own layout (fixed: its own global pattern; bigbird, variable:
        its own random blocks) instead of head 0's for all. Default false (DeepSpeed's).""",
    )
    num_local_blocks: int = setting(
        4,
        deepspeed="num_local_blocks",
        doc="""fixed: blocks in each local window (tokens attend within their window). Default 4.""",
    )
    num_global_blocks: int = setting(
        1,
        deepspeed="num_global_blocks",
        doc="""fixed: consecutive blocks at the end of each local window that every later (bidirectional:
        every) row attends to; must divide num_local_blocks. bigbird: blocks from index 0 that attend to
        and are attended by all. Default 1.""",
    )
    attention: str = setting(
        "bidirectional",
        deepspeed="attention",
        doc=""""unidirectional" (the layout's upper triangle empty, as for autoregressive models) or
        "bidirectional". A causal model (Llama, Mistral, Qwen) always applies the causal rule token by
        token on top of the layout; "unidirectional" also shapes the layout itself (fixed's global
        columns start at their own row, bigbird's random blocks are drawn from the past). Default
        "bidirectional" (DeepSpeed's).""",
    )
    horizontal_global_attention: bool = setting(
        False,
        deepspeed="horizontal_global_attention",
        doc="""fixed, variable: global blocks also attend to every block (rows as well as columns);
        bidirectional only. Default false.""",
    )
    num_different_global_patterns: int = setting(
        1,
        deepspeed="num_different_global_patterns",
        doc="""fixed: how many different choices of global block within a window the heads cycle through;
        more than 1 needs different_layout_per_head, at most num_local_blocks / num_global_blocks.
        Default 1.""",
    )
    num_random_blocks: int = setting(
        0,
        deepspeed="num_random_blocks",
        doc="""variable, bigbird: random blocks each block row attends to, drawn once from a fixed seed
        (the same on every rank, so no broadcast is needed; one layout for every layer, where DeepSpeed
        draws per layer). Default 0 (DeepSpeed's JSON default, also for bigbird).""",
    )
    local_window_blocks: tuple[int, ...] = setting(
        (4,),
        deepspeed="local_window_blocks",
        doc="""variable: block counts of the first local windows; the last one repeats for the rest of
        the sequence. Default [4].""",
    )
    global_block_indices: tuple[int, ...] = setting(
        (0,),
        deepspeed="global_block_indices",
        doc="""variable, bslongformer: global blocks (attended by all; bslongformer, and variable with
        horizontal_global_attention: also attending to all); with global_block_end_indices, the starts of
        global ranges. Default [0].""",
    )
    global_block_end_indices: tuple[int, ...] | None = setting(
        None,
        deepspeed="global_block_end_indices",
        doc="""variable, bslongformer: exclusive ends of the global ranges that start at
        global_block_indices (same length, each end after its start). Default null: single blocks.""",
    )
    num_sliding_window_blocks: int = setting(
        3,
        deepspeed="num_sliding_window_blocks",
        doc="""bigbird, bslongformer: width in blocks of the sliding window centred on each block row.
        Default 3.""",
    )

    def __post_init__(self) -> None:
        checks.choice(self, "mode", MODES)
        checks.integer(self, "block", minimum=1)
        checks.boolean(self, "different_layout_per_head")
        checks.boolean(self, "horizontal_global_attention")
        checks.choice(self, "attention", ATTENTION_TYPES)
        for name in ("num_local_blocks", "num_global_blocks", "num_different_global_patterns",
                     "num_sliding_window_blocks"):
            checks.integer(self, name, minimum=1)
        checks.integer(self, "num_random_blocks", minimum=0)
        _int_list(self, "local_window_blocks", minimum=1, empty=False)
        _int_list(self, "global_block_indices", minimum=0, empty=True)
        if self.global_block_end_indices is not None:
            _int_list(self, "global_block_end_indices", minimum=0, empty=True)
        self._check_mode_rules()
        self._warn_unread_keys()

    def _check_mode_rules(self) -> None:
        """The checks of DeepSpeed's layout constructors, for the keys the mode reads."""
        keys = MODE_KEYS[self.mode]
        if "horizontal_global_attention" in keys and self.horizontal_global_attention and \
                self.attention != "bidirectional":
            raise checks.fail(self, "horizontal_global_attention", "only bidirectional attention has horizontal "
                              "global attention (DeepSpeed's rule)", value=True,
                              allowed='false, or attention "bidirectional"')
        if self.mode == "fixed":
            if self.num_local_blocks % self.num_global_blocks:
                raise checks.fail(self, "num_global_blocks", f"does not divide num_local_blocks = "
                                  f"{self.num_local_blocks}", value=self.num_global_blocks,
                                  allowed=f"a divisor of {self.num_local_blocks}")
            patterns, most = self.num_different_global_patterns, self.num_local_blocks // self.num_global_blocks
            if patterns > 1 and not self.different_layout_per_head:
                raise checks.fail(self, "num_different_global_patterns", "more than one pattern needs "
                                  "different_layout_per_head = true", value=patterns, allowed="1")
            if patterns > most:
                raise checks.fail(self, "num_different_global_patterns", "more patterns than global positions in "
                                  f"a window (num_local_blocks / num_global_blocks = {most})", value=patterns,
                                  allowed=f"an integer from 1 to {most}")
        if "global_block_end_indices" in keys and self.global_block_end_indices is not None:
            starts, ends = self.global_block_indices, self.global_block_end_indices
            if len(starts) != len(ends):
                raise checks.fail(self, "global_block_end_indices", f"{len(ends)} ends for {len(starts)} starts "
                                  "(global_block_indices)", value=list(ends), allowed=f"{len(starts)} integers")
            for start, end in zip(starts, ends):
                if start >= end:
                    raise checks.fail(self, "global_block_end_indices", f"end {end} is not after its start {start}",
                                      value=list(ends), allowed="each end > its start in global_block_indices")

    def _warn_unread_keys(self) -> None:
        read = MODE_KEYS[self.mode]
        for field in dataclasses.fields(self):
            if field.name != "mode" and field.name not in read and getattr(self, field.name) != field.default:
                warnings.warn(f"{KEY}.{field.name} = {_plain(getattr(self, field.name))!r} is not read in mode "
                              f"{self.mode!r} (DeepSpeed ignores it too); the keys of that mode: {', '.join(read)}",
                              UserWarning, stacklevel=3)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _int_list(obj: object, field: str, *, minimum: int, empty: bool) -> None:
    """A list of integers >= minimum, stored as a tuple (the config is frozen and hashable)."""
    value = getattr(obj, field)
    allowed = f"a list of integers >= {minimum}" + ("" if empty else " (at least one)")
    if not isinstance(value, (list, tuple)) or (not value and not empty):
        raise checks.fail(obj, field, "not a list of integers", value=value, allowed=allowed)
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item < minimum:
            raise checks.fail(obj, field, f"item {item!r} is not an integer >= {minimum}", value=_plain(value),
                              allowed=allowed)
    object.__setattr__(obj, field, tuple(value))


__all__ = ["ATTENTION_TYPES", "KEY", "MODES", "MODE_KEYS", "SparseAttentionConfig"]
