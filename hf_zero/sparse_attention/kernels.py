"""Which FlexAttention kernel runs a sparse-attention ``BlockMask``: the tile, the kernel's block sizes, the compile.

[Note: tiles and kernel options]
A ``BlockMask`` skips or computes whole tiles of ``BLOCK_SIZE`` tokens; inside a computed tile the Triton
kernels walk blocks of their own (forward ``BLOCK_M`` queries x ``BLOCK_N`` keys; backward ``BLOCK_M1`` x
``BLOCK_N1`` for dK/dV, ``BLOCK_M2`` x ``BLOCK_N2`` for dQ), each of which must divide the tile.

- The tile (:func:`tile_for`): ``lcm(block, t)`` tokens for the ``t`` in {64, 128} that makes it smaller,
  ties to 128, i.e. 128-multiples for a ``block`` that is a multiple of 128 and 64-multiples otherwise.
  Smaller tiles skip more: the fixed layout with block 64 computes 0.26 of the causal triangle with
  64-token tiles and 0.51 with 128-token ones, where a tile column holding one 64-token global block is
  computed whole.
- 128-multiple tiles: torch's own kernel configs (its defaults divide 128), ``torch.compile``'s default
  mode; :func:`kernel_options` is None.
- Other tiles: :data:`NARROW` fixes every block size, stage and warp count. They are the configs
  max-autotune picked for a Llama-7B attention layer (bf16, head dim 128) with 64-token tiles on an H100
  (bench/results/h100_session10_call1_summary.md: 25.2 ms forward + backward at 32K tokens against dense
  SDPA's 55.7): forward 64 x 64 (its only candidate dividing 64), backward 32/64/64/32, 3 stages (the
  winner had 3 or 4), 4 warps. Shared memory, bf16, head dim 128: forward 3 stages x (K + V, 64 rows x
  256 bytes) + Q (64 x 256) = 112 KiB; backward K, V (64 rows) + 3 stages x (Q, dO, 32 rows) = 80 KiB
  per loop; under an A100's 164 KiB and an H100's 227 KiB. That holds for head rows of up to
  :data:`ROW_BYTES` (the head dim rounded up to a power of 2, times the element size: bf16/fp16 head dim
  <= 128, fp32 <= 64); wider heads keep 128-token tiles and torch's configs (:func:`tile_for`).
- Why fixed options are compiled with ``max_autotune`` and ``deterministic``: torch 2.11-2.13 drop a
  backward candidate whose own block sizes do not divide the tile *before* applying ``kernel_options``
  (torch/_inductor/kernel/flex/flex_attention.py, pytorch/pytorch#176025), and on an H100 at head dim 128
  the default mode's one candidate (64/128/128/64) does not divide 64: the backward would have no kernel
  ("NoValidChoicesError"). Under ``max_autotune`` the candidates include 32- and 64-row configs, which
  pass; :data:`NARROW` then sets every knob of every candidate, so all are the same kernel. Timing them
  would buy nothing and cost much: inductor times each on inputs of its own with every tile computed
  (dense attention, ~7 calls per candidate, 19 candidates: tens of seconds at 32K tokens by our
  estimate, four times that per doubling, and GPU memory for those inputs). Inductor's ``deterministic`` mode (torch >=
  2.10) takes the first candidate without timing ("skips any on device benchmarking"), so the kernel is
  compiled once and nothing is timed; its other effects are on how reductions are tuned (the backward's
  small row sums), not on FlexAttention. ``FORCE_USE_FLEX_ATTENTION`` keeps sequences under 128 tokens off
  the decoding kernel, which would take the forward block sizes too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

TILES = (64, 128)
"""The tiles a layout block is rounded up to (lcm): FlexAttention's default BLOCK_SIZE and its half."""
ROW_BYTES = 256
"""The widest head row (power-of-2 head dim x element size) :data:`NARROW` is sized for."""
NARROW: dict[str, Any] = {
    "fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
    "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
    "bwd_num_stages": 3, "bwd_num_warps": 4,
    "FORCE_USE_FLEX_ATTENTION": True,
}
"""FlexAttention ``kernel_options`` for tiles of 64-multiples (the Note: values, shared memory, why)."""


def row_bytes(query: torch.Tensor, value: torch.Tensor) -> int:
    """Bytes of one head row as the kernels hold it: the wider head dim rounded up to a power of 2."""
    dim = max(query.shape[-1], value.shape[-1])
    return (1 << (dim - 1).bit_length()) * query.element_size()


def tile_for(block: int, head_row_bytes: int = ROW_BYTES) -> int:
    """The tile (64 or 128 tokens) whose lcm with ``block`` is smaller, ties to 128; 128 for head rows
    wider than :data:`ROW_BYTES` (the Note). The block mask's tiles are ``lcm(block, tile)`` tokens."""
    if head_row_bytes > ROW_BYTES:
        return 128
    return min(TILES, key=lambda tile: (math.lcm(block, tile), -tile))


def kernel_options(tile: int, head_row_bytes: int) -> dict[str, Any] | None:
    """``kernel_options`` for a block mask of ``tile``-token tiles: None (torch's own) for multiples of
    128, :data:`NARROW` for multiples of 64 with head rows of up to :data:`ROW_BYTES`."""
    if tile % 128 == 0:
        return None
    if tile % 64 == 0 and head_row_bytes <= ROW_BYTES:
        return NARROW
    raise ValueError(f"sparse_attention: no FlexAttention kernel options for {tile}-token tiles with "
                     f"{head_row_bytes}-byte head rows; allowed: tiles of multiples of 128, or of 64 for head "
                     f"rows of at most {ROW_BYTES} bytes (kernels.tile_for picks the tile)")


FIXED_COMPILE = {"max_autotune": True, "deterministic": True}
"""``torch.compile`` options for :data:`NARROW` (the Note: why both)."""

_COMPILED: dict[str, Any] = {}  # "default" / "fixed": the compiled flex_attention of each


def _compiled(fixed: bool):
    """``flex_attention`` compiled (eager FlexAttention materialises the scores): in the default mode for
    torch's own configs, with :data:`FIXED_COMPILE` for fixed options."""
    name = "fixed" if fixed else "default"
    if name not in _COMPILED:
        options = FIXED_COMPILE if fixed else None
        _COMPILED[name] = torch.compile(flex_attention, dynamic=False, options=options)
    return _COMPILED[name]


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockMask, *,
           scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """FlexAttention over ``mask``: eager on CPU (no kernel options there), else compiled with the
    options of the mask's tile (the Note)."""
    if query.device.type == "cpu":
        return flex_attention(query, key, value, block_mask=mask, scale=scale, enable_gqa=enable_gqa)
    options = kernel_options(mask.BLOCK_SIZE[0], row_bytes(query, value))
    return _compiled(options is not None)(query, key, value, block_mask=mask, scale=scale, enable_gqa=enable_gqa,
                                          kernel_options=options)


__all__ = ["FIXED_COMPILE", "NARROW", "ROW_BYTES", "TILES", "attend", "kernel_options", "row_bytes", "tile_for"]
