"""Sparse attention on a GPU: compiled FlexAttention with the layout's block mask, forward and gradients,
against dense SDPA with the same boolean mask expanded from the layout (fp32, 1e-5); the paths the CPU
tests cannot reach (FlexAttention has no CPU backward, and eager FlexAttention ignores which tiles the
block mask marks full).

    pytest tests/gpu/test_sparse_attention_flex.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_zero.sparse_attention import flex
from hf_zero.config.sparse_attention import SparseAttentionConfig
from hf_zero.sparse_attention.layouts import make_layout, num_blocks

pytestmark = [pytest.mark.gpu]
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

CONFIGS = [
    dict(mode="fixed", block=64, attention="unidirectional"),
    dict(mode="fixed", block=16),
    dict(mode="bigbird", block=32, num_random_blocks=1, different_layout_per_head=True),
    dict(mode="bslongformer", block=64, global_block_indices=[0, 5]),
    dict(mode="variable", block=128, local_window_blocks=[1, 3], global_block_indices=[2], num_random_blocks=1),
]


def _reference(q, k, v, layout, block, seq_len, padding):
    ones = torch.ones(block, block, device=layout.device)
    mask = torch.stack([torch.kron(h.float(), ones) for h in layout]).bool()[:, :seq_len, :seq_len][None]
    mask = mask & torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    empty = ~mask.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, enable_gqa=True).masked_fill(empty, 0.0)


@pytest.mark.parametrize("case", CONFIGS, ids=lambda c: f"{c['mode']}-{c['block']}")
@pytest.mark.parametrize("seq_len, padded", [(1024, False), (1000, True)])
def test_compiled_flex_forward_and_grads_match_dense_sdpa(case, seq_len, padded):
    config = SparseAttentionConfig(**case)
    heads = 8 if config.different_layout_per_head else 1
    layout = make_layout(config, heads, num_blocks(config, seq_len) * config.block).bool().cuda()
    padding = torch.stack([torch.arange(seq_len) >= 37, torch.arange(seq_len) < seq_len - 100]).cuda() if padded \
        else None
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, seq_len, 64, device="cuda", generator=g)
    k, v = (torch.randn(2, 2, seq_len, 64, device="cuda", generator=g) for _ in range(2))
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = flex.block_mask(layout, config.block, seq_len, causal=True, padding=padding)
    out = flex._flex(q.device)(*ours, block_mask=mask, enable_gqa=True)
    want = _reference(*ref, layout, config.block, seq_len, padding)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    grad = torch.randn(out.shape, device="cuda", generator=g)
    out.backward(grad)
    want.backward(grad)
    for name, a, b in zip("qkv", ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


def test_attention_function_on_cuda_takes_flex():
    """With gradients on CUDA the registered function runs FlexAttention (not the dense CPU path)."""
    attention = flex.SparseAttention(SparseAttentionConfig(mode="fixed", block=64))

    class Module(torch.nn.Module):
        is_causal = True

    q = torch.randn(1, 4, 512, 64, device="cuda", requires_grad=True)
    assert not flex._needs_dense(q)
    out, _ = attention(Module(), q, q, q, None)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
