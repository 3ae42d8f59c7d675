"""The layout as a FlexAttention block mask, and the attention function, against dense SDPA with the same
boolean mask expanded from the layout (fp32, 1e-5).

On CPU FlexAttention runs forward only (torch 2.13 has no CPU backward, eager or compiled), and eager
FlexAttention evaluates the mask function on every tile, full or not; so the block structure itself (which
tiles are skipped, which are computed without the mask) is checked tile by tile here, and the FlexAttention
gradients on a GPU (tests/gpu/test_sparse_attention_flex.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask, flex_attention

from hf_zero.sparse_attention import flex
from hf_zero.config.sparse_attention import SparseAttentionConfig
from hf_zero.sparse_attention.layouts import make_layout, num_blocks

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CONFIGS = [
    dict(mode="fixed", block=4, attention="unidirectional"),
    dict(mode="fixed", block=8, num_local_blocks=2, different_layout_per_head=True, num_different_global_patterns=2),
    dict(mode="bigbird", block=4, num_random_blocks=1, different_layout_per_head=True),
    dict(mode="bslongformer", block=16, num_sliding_window_blocks=1, global_block_indices=[1]),
    dict(mode="variable", block=4, local_window_blocks=[2, 6], global_block_indices=[3], num_random_blocks=1),
    dict(mode="dense", block=4),
]
LENGTHS = (37, 64, 96)
HEADS = 4


def _layout(config: SparseAttentionConfig, seq_len: int) -> torch.Tensor:
    heads = HEADS if config.different_layout_per_head else 1
    return make_layout(config, heads, num_blocks(config, seq_len) * config.block).bool()


def _reference_mask(layout, block, seq_len, causal, padding):
    """The token mask, expanded here with kron (not with flex.expand_layout)."""
    ones = torch.ones(block, block)
    dense = torch.stack([torch.kron(h.float(), ones) for h in layout]).bool()[:, :seq_len, :seq_len][None]
    if causal:
        dense = dense & torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    if padding is not None:
        dense = dense & padding[:, None, None, :]
    return dense


def _sdpa(q, k, v, mask):
    empty = ~mask.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, enable_gqa=True).masked_fill(empty, 0.0)


def _padding(seq_len):
    left = torch.arange(seq_len) >= 5  # left padding: five pad tokens first
    right = torch.arange(seq_len) < seq_len - 3
    return torch.stack([left, right])


@pytest.mark.parametrize("case", CONFIGS, ids=lambda c: c["mode"])
@pytest.mark.parametrize("causal", (True, False))
@pytest.mark.parametrize("padded", (False, True))
def test_block_structure(case, causal, padded):
    """Tiles left out hold no True of the mask, tiles marked full are all True, the rest are masked by the
    mask function exactly as the dense mask."""
    config = SparseAttentionConfig(**case)
    for seq_len in LENGTHS:
        layout = _layout(config, seq_len)
        padding = _padding(seq_len) if padded else None
        mask = flex.block_mask(layout, config.block, seq_len, causal=causal, padding=padding, tile=16)
        want = _reference_mask(layout, config.block, seq_len, causal, padding).expand(2, layout.shape[0], -1, -1)
        t = mask.BLOCK_SIZE[0]
        kinds = torch.zeros(1, layout.shape[0], -(-seq_len // t), -(-seq_len // t), dtype=torch.int8)  # 0 out
        for num, idx, kind in ((mask.kv_num_blocks, mask.kv_indices, 1), (mask.full_kv_num_blocks,
                                                                          mask.full_kv_indices, 2)):
            for h, i in torch.cartesian_prod(torch.arange(num.shape[1]), torch.arange(num.shape[2])).tolist():
                for j in idx[0, h, i, :num[0, h, i]].tolist():
                    assert kinds[0, h, i, j] == 0, "a tile listed twice"
                    kinds[0, h, i, j] = kind
        for h, i, j in torch.cartesian_prod(*(torch.arange(s) for s in kinds.shape[1:])).tolist():
            tile = want[:, h, i * t:(i + 1) * t, j * t:(j + 1) * t]
            if kinds[0, h, i, j] == 0:
                assert not tile.any(), (h, i, j)
            if kinds[0, h, i, j] == 2:
                assert tile.all(), (h, i, j)
            inside = (j + 1) * t <= seq_len and (i + 1) * t <= seq_len
            if not padded and inside and tile.all():  # every tile that can skip the mask does
                assert kinds[0, h, i, j] == 2, (h, i, j)
        evaluated = create_mask(mask.mask_mod, 2, layout.shape[0], seq_len, seq_len, device="cpu")
        assert torch.equal(evaluated, want)


@pytest.mark.parametrize("case", CONFIGS, ids=lambda c: c["mode"])
def test_flex_forward_matches_dense_sdpa(case):
    config = SparseAttentionConfig(**case)
    g = torch.Generator().manual_seed(0)
    for seq_len, padded in ((64, False), (37, True), (96, True)):
        q = torch.randn(2, HEADS, seq_len, 16, generator=g)
        k, v = (torch.randn(2, 2, seq_len, 16, generator=g) for _ in range(2))  # grouped-query: 2 KV heads
        layout = _layout(config, seq_len)
        padding = _padding(seq_len) if padded else None
        mask = flex.block_mask(layout, config.block, seq_len, causal=True, padding=padding)
        got = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
        want = _sdpa(q, k, v, _reference_mask(layout, config.block, seq_len, True, padding))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


class _Module(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("case", CONFIGS[:3], ids=lambda c: c["mode"])
def test_attention_function_output_and_grads(case):
    """On CPU with gradients the function runs SDPA with the expanded mask; without, FlexAttention. Both
    equal the reference, and the gradients equal the reference's."""
    config = SparseAttentionConfig(**case)
    attention = flex.SparseAttention(config)
    g = torch.Generator().manual_seed(1)
    seq_len = 48
    q, k, v = (torch.randn(2, HEADS, seq_len, 8, generator=g, requires_grad=True) for _ in range(3))
    padding = _padding(seq_len)
    out, weights = attention(_Module(), q, k, v, padding, scaling=0.3)
    assert weights is None and out.shape == (2, seq_len, HEADS, 8)
    ref_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mask = _reference_mask(_layout(config, seq_len), config.block, seq_len, True, padding)
    empty = ~mask.any(-1, keepdim=True)
    want = F.scaled_dot_product_attention(*ref_inputs, attn_mask=mask | empty, scale=0.3).masked_fill(empty, 0.0)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=0, atol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    want.transpose(1, 2).backward(grad)
    for got_t, ref_t in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(got_t.grad, ref_t.grad, rtol=0, atol=1e-5)
    with torch.no_grad():
        flex_out, _ = attention(_Module(), q, k, v, padding, scaling=0.3)
    torch.testing.assert_close(flex_out, want.transpose(1, 2).detach(), rtol=0, atol=1e-5)


def test_attention_function_refusals():
    attention = flex.SparseAttention(SparseAttentionConfig(block=4))
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(NotImplementedError, match="8 queries for 9 keys"):
        attention(_Module(), q, torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), None)
    with pytest.raises(ValueError, match="attention dropout 0.1"):
        attention(_Module(), q, q, q, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        attention(_Module(), q, q, q, None, sliding_window=4)
    with pytest.raises(NotImplementedError, match="4-D"):
        attention(_Module(), q, q, q, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="decoding with a cache"):
        flex.padding_mask(1, 1, 9, q_offset=8, kv_offset=0, attention_mask=None)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        flex.padding_mask(1, 8, 8, attention_mask=None, allow_is_causal_skip=False)
    assert flex.padding_mask(2, 8, 8, attention_mask=torch.ones(2, 8, dtype=torch.long)) is None
    pad = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8])
    assert torch.equal(flex.padding_mask(2, 8, 8, attention_mask=pad), pad.bool())
