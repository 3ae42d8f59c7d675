"""Each mode's layout equals DeepSpeed's (a transcription of its builders: deepspeed_layouts.py) on small
sizes: every key of the mode varied, uni- and bidirectional, one layout or one per head, sequences that
end inside a local window, random blocks drawn from the same seed."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch

from hf_zero.config.sparse_attention import SparseAttentionConfig
from hf_zero.sparse_attention.layouts import make_layout
from tests.sparse_attention import deepspeed_layouts as ds

HEADS = 4
BLOCK = 2
LENGTHS = (2, 8, 14, 24, 34)  # 1 to 17 blocks: short windows at the end, fewer blocks than a window


def _cases() -> list[dict]:
    both = ("unidirectional", "bidirectional")
    cases = [dict(mode="dense")]
    for att, per_head, local, glob, patterns, horizontal in itertools.product(both, (False, True), (3, 4), (1, 2, 3),
                                                                              (1, 2), (False, True)):
        if local % glob or (patterns > 1 and not per_head) or patterns > local // glob or \
                (horizontal and att != "bidirectional"):
            continue
        cases.append(dict(mode="fixed", attention=att, different_layout_per_head=per_head, num_local_blocks=local,
                          num_global_blocks=glob, num_different_global_patterns=patterns,
                          horizontal_global_attention=horizontal))
    for att, per_head, rnd, windows, (starts, ends), horizontal in itertools.product(
            both, (False, True), (0, 2), ((4,), (1, 3), (2, 5, 2)), (((0,), None), ((1, 6), None), ((0, 5), (2, 7))),
            (False, True)):
        if horizontal and att != "bidirectional":
            continue
        cases.append(dict(mode="variable", attention=att, different_layout_per_head=per_head, num_random_blocks=rnd,
                          local_window_blocks=windows, global_block_indices=starts, global_block_end_indices=ends,
                          horizontal_global_attention=horizontal))
    for att, per_head, rnd, width, glob in itertools.product(both, (False, True), (0, 1, 2), (1, 3, 4), (1, 2)):
        if att == "unidirectional" and rnd > 1:
            continue  # DeepSpeed's draw from a causal row 0 of one block fails (tested below)
        cases.append(dict(mode="bigbird", attention=att, different_layout_per_head=per_head, num_random_blocks=rnd,
                          num_sliding_window_blocks=width, num_global_blocks=glob))
    for att, per_head, width, (starts, ends) in itertools.product(both, (False, True), (1, 3, 5),
                                                                 (((0,), None), ((2, 9), None), ((0, 4), (1, 8)))):
        cases.append(dict(mode="bslongformer", attention=att, different_layout_per_head=per_head,
                          num_sliding_window_blocks=width, global_block_indices=starts, global_block_end_indices=ends))
    return cases


def _reference(config: SparseAttentionConfig, seq_len: int, seed: int) -> torch.Tensor:
    cfg = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    cfg["num_heads"] = HEADS
    random.seed(seed)
    return ds.BUILDERS[config.mode](cfg, seq_len)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: "-".join(str(v) for v in c.values()))
def test_layout_matches_deepspeed(case):
    config = SparseAttentionConfig(block=BLOCK, **case)
    compared = 0
    for seq_len in LENGTHS:
        try:
            expected = _reference(config, seq_len, seed=seq_len)
        except ValueError:  # DeepSpeed refuses this length (fewer blocks than a window, random or global blocks)
            with pytest.raises(ValueError):
                make_layout(config, HEADS, seq_len, seed=seq_len)
            continue
        got = make_layout(config, HEADS, seq_len, seed=seq_len)
        assert got.dtype == torch.int64 and got.shape == expected.shape
        assert torch.equal(got, expected), f"{case} at {seq_len} tokens:\n{got}\n!=\n{expected}"
        compared += 1
    assert compared >= 2


def test_random_blocks_come_from_the_seed():
    config = SparseAttentionConfig(mode="bigbird", block=BLOCK, num_random_blocks=2, different_layout_per_head=True)
    a, b = make_layout(config, HEADS, 64, seed=3), make_layout(config, HEADS, 64, seed=4)
    assert torch.equal(a, make_layout(config, HEADS, 64, seed=3))
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # a layout per head: each head its own draw


def test_fixed_worked_example():
    """The example in layouts.py's docstring."""
    config = SparseAttentionConfig(mode="fixed", block=1, attention="unidirectional")
    rows = ["1.......", "11......", "111.....", "1111....", "...11...", "...111..", "...1111.", "...11111"]
    expected = torch.tensor([[c == "1" for c in r] for r in rows], dtype=torch.int64)
    assert torch.equal(make_layout(config, 1, 8)[0], expected)


def test_refusals():
    with pytest.raises(ValueError, match="not a multiple of block = 2"):
        make_layout(SparseAttentionConfig(block=2), 1, 7)
    with pytest.raises(ValueError, match="num_sliding_window_blocks = 5"):
        make_layout(SparseAttentionConfig(mode="bslongformer", block=2, num_sliding_window_blocks=5), 1, 8)
    with pytest.raises(ValueError, match="num_random_blocks = 2.*unidirectional"):
        make_layout(SparseAttentionConfig(mode="bigbird", block=2, num_random_blocks=2, attention="unidirectional"),
                    1, 16)
