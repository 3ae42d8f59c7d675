"""Each mode's block layout, built as DeepSpeed builds it.

A layout is an int64 tensor ``[heads, blocks, blocks]``: entry ``[h, i, j]`` is 1 when head ``h``'s
query block ``i`` attends to key block ``j`` (a block is ``config.block`` tokens). The functions follow
``deepspeed/ops/sparse_attention/sparsity_config.py`` step for step (``make_layout`` of
``DenseSparsityConfig``, ``FixedSparsityConfig``, ``VariableSparsityConfig``, ``BigBirdSparsityConfig``,
``BSLongformerSparsityConfig``): for each head that has its own layout (all heads with
``different_layout_per_head``, else head 0) the random, local and global parts are set in DeepSpeed's
order, then head 0's layout is copied to the others.

Random blocks come from ``random.Random(seed)`` drawn in DeepSpeed's order, so the layout is the same on
every rank without DeepSpeed's broadcast from rank 0 (and, with the same seed given to Python's global
``random``, equal to DeepSpeed's).

Worked example, fixed, 8 blocks, ``num_local_blocks`` 4, ``num_global_blocks`` 1, unidirectional
(rows are query blocks; the last block of each window, 3, is global for every later row)::

    1 . . . . . . .
    1 1 . . . . . .
    1 1 1 . . . . .
    1 1 1 1 . . . .
    . . . 1 1 . . .
    . . . 1 1 1 . .
    . . . 1 1 1 1 .
    . . . 1 1 1 1 1
"""

from __future__ import annotations

import random

import torch

from hf_zero.config.sparse_attention import KEY, SparseAttentionConfig

SEED = 0
"""The seed of the random blocks (bigbird, variable): one layout on every rank, every run."""


def num_blocks(config: SparseAttentionConfig, seq_len: int) -> int:
    """Blocks covering ``seq_len`` tokens (the sequence padded up to a multiple of ``block``)."""
    return -(-seq_len // config.block)


def make_layout(config: SparseAttentionConfig, num_heads: int, seq_len: int, seed: int = SEED) -> torch.Tensor:
    """The ``[num_heads, blocks, blocks]`` layout of ``config`` for ``seq_len`` tokens (module docstring)."""
    if seq_len % config.block:
        raise ValueError(f"{KEY}: a layout covers whole blocks; sequence length {seq_len} is not a multiple of "
                         f"block = {config.block} (pad it up: num_blocks() * block)")
    n = seq_len // config.block
    layout = torch.zeros((num_heads, n, n), dtype=torch.int64)
    if config.mode == "dense":
        layout[:] = 1
        return layout
    rng = random.Random(seed)
    for h in range(num_heads if config.different_layout_per_head else 1):
        _BUILDERS[config.mode](config, h, layout[h], rng)
    if not config.different_layout_per_head:
        layout[1:] = layout[0]
    return layout


def _causal(config: SparseAttentionConfig) -> bool:
    return config.attention == "unidirectional"


def _windows(head: torch.Tensor, start: int, end: int, causal: bool) -> None:
    """Block rows ``start:end`` attend to every block of the window (causal: up to the diagonal)."""
    for row in range(start, end):
        head[row, start:(row + 1 if causal else end)] = 1


def _fixed(config: SparseAttentionConfig, h: int, head: torch.Tensor, rng: random.Random) -> None:
    n, local, glob = head.shape[0], config.num_local_blocks, config.num_global_blocks
    for i in range(0, n, local):  # set_local_layout
        _windows(head, i, min(i + local, n), _causal(config))
    first = local - (1 + h % config.num_different_global_patterns) * glob  # set_global_layout
    end = n - (n % local)
    for i in range(first, end, local):
        head[0 if not _causal(config) else i:, i:i + glob] = 1
        if config.horizontal_global_attention:
            head[i:i + glob, :] = 1
    if end < n:  # a short last window: its global blocks, kept inside the sequence
        start = min(end + first, n - glob)
        head[0 if not _causal(config) else start:, start:start + glob] = 1
        if config.horizontal_global_attention:
            head[start:start + glob, :] = 1


def _random_rows(head: torch.Tensor, count: int, rng: random.Random, causal: bool, what: str) -> None:
    n = head.shape[0]
    if n < count:
        raise ValueError(f"{KEY}.num_random_blocks = {count} is more than the {n} blocks of a row of this sequence "
                         f"({what}); lower it or train on longer sequences")
    if causal and count > 1:
        raise ValueError(f"{KEY}.num_random_blocks = {count} with attention 'unidirectional': block row 0 has one "
                         "block to draw from (DeepSpeed's draw fails here too); use 0 or 1, or 'bidirectional'")
    for row in range(n):
        head[row, rng.sample(range(0, row + 1 if causal else n), count)] = 1


def _variable(config: SparseAttentionConfig, h: int, head: torch.Tensor, rng: random.Random) -> None:
    n = head.shape[0]
    _random_rows(head, config.num_random_blocks, rng, False, "variable")  # DeepSpeed draws over all columns
    start = 0
    for size in config.local_window_blocks:  # set_local_layout
        _windows(head, start, min(start + size, n), _causal(config))
        start += size
    for i in range(start, n, config.local_window_blocks[-1]):
        _windows(head, i, min(i + config.local_window_blocks[-1], n), _causal(config))
    for first, last in _global_ranges(config, n):  # set_global_layout
        if config.horizontal_global_attention:
            head[first:last, :] = 1
        head[0 if not _causal(config) else first:, first:last] = 1


def _global_ranges(config: SparseAttentionConfig, n: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each global range inside ``n`` blocks (ranges starting past the end dropped)."""
    ends = config.global_block_end_indices or tuple(i + 1 for i in config.global_block_indices)
    return [(start, min(end, n)) for start, end in zip(config.global_block_indices, ends) if start < n]


def _sliding(config: SparseAttentionConfig, head: torch.Tensor) -> None:
    n, width = head.shape[0], config.num_sliding_window_blocks
    if n < width:
        raise ValueError(f"{KEY}.num_sliding_window_blocks = {width} is more than the {n} blocks of this sequence; "
                         "lower it or train on longer sequences")
    for row in range(n):
        head[row, max(0, row - width // 2):min(row + width // 2 + 1, n)] = 1


def _bigbird(config: SparseAttentionConfig, h: int, head: torch.Tensor, rng: random.Random) -> None:
    n, glob = head.shape[0], config.num_global_blocks
    _random_rows(head, config.num_random_blocks, rng, _causal(config), "bigbird")
    _sliding(config, head)
    if n < glob:
        raise ValueError(f"{KEY}.num_global_blocks = {glob} is more than the {n} blocks of this sequence; lower it")
    head[:glob, :] = 1
    head[:, :glob] = 1
    if _causal(config):
        head.copy_(head.tril())


def _bslongformer(config: SparseAttentionConfig, h: int, head: torch.Tensor, rng: random.Random) -> None:
    n = head.shape[0]
    _sliding(config, head)
    for first, last in _global_ranges(config, n):
        head[first:last, :] = 1
        head[:, first:last] = 1
    if _causal(config):
        head.copy_(head.tril())


_BUILDERS = {"fixed": _fixed, "variable": _variable, "bigbird": _bigbird, "bslongformer": _bslongformer}

__all__ = ["SEED", "make_layout", "num_blocks"]
