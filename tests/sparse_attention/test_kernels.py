"""The tile a layout block gets and the FlexAttention kernel options that go with it (kernels.py, [Note: tiles
and kernel options]); that the kernels compile and run is tests/gpu/test_sparse_attention_flex.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import FlexKernelOptions

from hf_zero.config.sparse_attention import SparseAttentionConfig
from hf_zero.sparse_attention import flex, kernels

BF16_128 = 128 * 2  # bytes of a bf16 head row of head dim 128


@pytest.mark.parametrize("block, tile", [(1, 64), (16, 64), (32, 64), (48, 64), (64, 64), (96, 64), (100, 64),
                                         (128, 128), (192, 64), (256, 128), (384, 128), (320, 64)])
def test_tile_for(block, tile):
    assert kernels.tile_for(block, BF16_128) == tile
    assert kernels.tile_for(block) == tile
    other = 192 - tile  # the other of 64 and 128: never a smaller lcm
    assert math.lcm(block, tile) <= math.lcm(block, other)
    assert kernels.tile_for(block, 2 * BF16_128) == 128  # wider heads keep torch's own 128-token tiles


def test_row_bytes():
    def row(dim, dtype, v_dim=None):
        return kernels.row_bytes(torch.empty(1, 1, 1, dim, dtype=dtype), torch.empty(1, 1, 1, v_dim or dim))

    assert row(128, torch.bfloat16) == row(64, torch.float32) == row(96, torch.float16) == 256
    assert row(80, torch.float32) == row(256, torch.bfloat16) == row(64, torch.bfloat16, v_dim=200) == 512


def test_kernel_options_divide_every_tile():
    """For every block the tile rule gives, the fixed block sizes divide the block mask's tile, keep the
    backward kernel's static asserts (BLOCK_N1 % BLOCK_M1, BLOCK_M2 % BLOCK_N2), and are options torch knows."""
    known = set(FlexKernelOptions.__annotations__)
    fixed = 0
    for block in range(1, 513):
        tile = math.lcm(block, kernels.tile_for(block))
        options = kernels.kernel_options(tile, BF16_128)
        assert (options is None) == (tile % 128 == 0), block
        if options is None:
            continue
        fixed += 1
        sizes = {k.split("_", 1)[1]: v for k, v in options.items() if "BLOCK" in k}
        assert set(sizes) == {"BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"}
        assert all(tile % size == 0 for size in sizes.values()), (block, tile, sizes)
        assert sizes["BLOCK_N1"] % sizes["BLOCK_M1"] == 0 and sizes["BLOCK_M2"] % sizes["BLOCK_N2"] == 0
        for name in options:
            bare = name.removeprefix("fwd_").removeprefix("bwd_")
            assert bare in known, name
    assert fixed > 400  # most blocks (all but multiples of 128) run on the fixed options


def test_fixed_compile_options_are_inductor_settings():
    """torch.compile refuses an unknown option only when it compiles, which is on a GPU: check here."""
    import torch._inductor.config as inductor_config

    assert all(hasattr(inductor_config, name) for name in kernels.FIXED_COMPILE)


def test_kernel_options_refusals():
    with pytest.raises(ValueError, match="32-token tiles with 256-byte head rows; allowed: tiles of multiples"):
        kernels.kernel_options(32, BF16_128)
    with pytest.raises(ValueError, match="64-token tiles with 512-byte head rows"):
        kernels.kernel_options(64, 2 * BF16_128)
    assert kernels.kernel_options(384, 4 * BF16_128) is None


def test_attention_masks_take_the_heads_tile():
    """The attention function's block mask: 64-token tiles for block 64 (bf16 head dim 128 and fp32 64),
    128 for wider heads and for block 128."""
    attention = flex.SparseAttention(SparseAttentionConfig(mode="fixed", block=64))
    sizes = {}
    for dim, dtype in ((128, torch.bfloat16), (64, torch.float32), (128, torch.float32)):
        q = torch.zeros(1, 2, 256, dim, dtype=dtype)
        sizes[dim, dtype] = attention.block_mask(q, q, True, None).BLOCK_SIZE
    assert sizes == {(128, torch.bfloat16): (64, 64), (64, torch.float32): (64, 64),
                     (128, torch.float32): (128, 128)}
    wide = flex.SparseAttention(SparseAttentionConfig(mode="fixed", block=128))
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    assert wide.block_mask(q, q, True, None).BLOCK_SIZE == (128, 128)
    assert flex.block_mask(torch.ones(1, 4, 4, dtype=torch.bool), 16, 64, causal=True).BLOCK_SIZE == (64, 64)
