"""A transcription of DeepSpeed's layout builders (deepspeed/ops/sparse_attention/sparsity_config.py,
DeepSpeed 0.19.x): the loops of ``make_layout`` and its ``set_*_layout`` steps as written there, with
``self.x`` turned into ``cfg["x"]`` and the layout created as ``setup_layout`` does. The reference that
hf_zero's layouts.py is held against (test_layouts.py); randomness from Python's global ``random``,
as in DeepSpeed.
"""

from __future__ import annotations

import random

import torch


def setup_layout(cfg, seq_len):
    if seq_len % cfg["block"] != 0:
        raise ValueError(f"Sequence Length, {seq_len}, needs to be dividable by Block size {cfg['block']}!")
    num_blocks = seq_len // cfg["block"]
    return torch.zeros((cfg["num_heads"], num_blocks, num_blocks), dtype=torch.int64)


def propagate(cfg, layout):
    if not cfg["different_layout_per_head"]:
        layout[1:cfg["num_heads"], :, :] = layout[0, :, :]
    return layout


def layout_heads(cfg):
    return cfg["num_heads"] if cfg["different_layout_per_head"] else 1


def dense(cfg, seq_len):
    layout = setup_layout(cfg, seq_len)
    layout[:, :, :] = 1
    return layout


def fixed(cfg, seq_len):
    layout = setup_layout(cfg, seq_len)
    for h in range(0, layout_heads(cfg)):
        num_blocks = layout.shape[1]
        for i in range(0, num_blocks, cfg["num_local_blocks"]):
            end = min(i + cfg["num_local_blocks"], num_blocks)
            for row in range(i, end):
                for col in range(i, (row + 1 if cfg["attention"] == "unidirectional" else end)):
                    layout[h, row, col] = 1
        first_global_block_idx = cfg["num_local_blocks"] - (
            1 + h % cfg["num_different_global_patterns"]) * cfg["num_global_blocks"]
        end = num_blocks - (num_blocks % cfg["num_local_blocks"])
        for i in range(first_global_block_idx, end, cfg["num_local_blocks"]):
            first_row = 0 if cfg["attention"] == "bidirectional" else i
            layout[h, first_row:, i:i + cfg["num_global_blocks"]] = 1
            if cfg["horizontal_global_attention"]:
                layout[h, i:i + cfg["num_global_blocks"], :] = 1
        if end < num_blocks:
            start = min(end + first_global_block_idx, num_blocks - cfg["num_global_blocks"])
            end = start + cfg["num_global_blocks"]
            first_row = 0 if cfg["attention"] == "bidirectional" else start
            layout[h, first_row:, start:end] = 1
            if cfg["horizontal_global_attention"]:
                layout[h, start:end, :] = 1
    return propagate(cfg, layout)


def variable(cfg, seq_len):
    layout = setup_layout(cfg, seq_len)
    for h in range(0, layout_heads(cfg)):
        num_blocks = layout.shape[1]
        if num_blocks < cfg["num_random_blocks"]:
            raise ValueError("random blocks")
        for row in range(0, num_blocks):
            rnd_cols = random.sample(range(0, num_blocks), cfg["num_random_blocks"])
            layout[h, row, rnd_cols] = 1
        start_block_idx = 0
        end_block_idx = 0
        for block_size in cfg["local_window_blocks"]:
            end_block_idx += block_size
            end_block_idx = min(end_block_idx, num_blocks)
            for row in range(start_block_idx, end_block_idx):
                for col in range(start_block_idx, (row + 1 if cfg["attention"] == "unidirectional" else end_block_idx)):
                    layout[h, row, col] = 1
            start_block_idx += block_size
        for i in range(start_block_idx, num_blocks, block_size):
            end_block_idx = min(i + block_size, num_blocks)
            for row in range(i, end_block_idx):
                for col in range(i, (row + 1 if cfg["attention"] == "unidirectional" else end_block_idx)):
                    layout[h, row, col] = 1
        if cfg["global_block_end_indices"] is None:
            for idx in cfg["global_block_indices"]:
                if idx < num_blocks:
                    if cfg["horizontal_global_attention"]:
                        layout[h, idx, :] = 1
                    first_row = 0 if cfg["attention"] == "bidirectional" else idx
                    layout[h, first_row:, idx] = 1
        else:
            for _, (start_idx, end_idx) in enumerate(zip(cfg["global_block_indices"], cfg["global_block_end_indices"])):
                if start_idx < num_blocks:
                    end_idx = min(end_idx, num_blocks)
                    if cfg["horizontal_global_attention"]:
                        layout[h, start_idx:end_idx, :] = 1
                    first_row = 0 if cfg["attention"] == "bidirectional" else start_idx
                    layout[h, first_row:, start_idx:end_idx] = 1
    return propagate(cfg, layout)


def _sliding(cfg, h, layout):
    num_blocks = layout.shape[1]
    if num_blocks < cfg["num_sliding_window_blocks"]:
        raise ValueError("sliding window")
    w = cfg["num_sliding_window_blocks"] // 2
    for row in range(0, num_blocks):
        start = max(0, row - w)
        end = min(row + w + 1, num_blocks)
        layout[h, row, start:end] = 1
    return layout


def bigbird(cfg, seq_len):
    layout = setup_layout(cfg, seq_len)
    for h in range(0, layout_heads(cfg)):
        num_blocks = layout.shape[1]
        if num_blocks < cfg["num_random_blocks"]:
            raise ValueError("random blocks")
        for row in range(0, num_blocks):
            sample_range = range(0, num_blocks) if cfg["attention"] == "bidirectional" else range(0, row + 1)
            rnd_cols = random.sample(sample_range, cfg["num_random_blocks"])
            layout[h, row, rnd_cols] = 1
        layout = _sliding(cfg, h, layout)
        if num_blocks < cfg["num_global_blocks"]:
            raise ValueError("global blocks")
        layout[h, 0:cfg["num_global_blocks"], :] = 1
        layout[h, :, 0:cfg["num_global_blocks"]] = 1
        if cfg["attention"] == "unidirectional":
            layout = torch.tril(layout)
    return propagate(cfg, layout)


def bslongformer(cfg, seq_len):
    layout = setup_layout(cfg, seq_len)
    for h in range(0, layout_heads(cfg)):
        layout = _sliding(cfg, h, layout)
        num_blocks = layout.shape[1]
        if cfg["global_block_end_indices"] is None:
            for idx in cfg["global_block_indices"]:
                if idx < num_blocks:
                    layout[h, idx, :] = 1
                    layout[h, :, idx] = 1
        else:
            for _, (start_idx, end_idx) in enumerate(zip(cfg["global_block_indices"], cfg["global_block_end_indices"])):
                if start_idx < num_blocks:
                    end_idx = min(end_idx, num_blocks)
                    layout[h, start_idx:end_idx, :] = 1
                    layout[h, :, start_idx:end_idx] = 1
        if cfg["attention"] == "unidirectional":
            layout = torch.tril(layout)
    return propagate(cfg, layout)


BUILDERS = {"dense": dense, "fixed": fixed, "variable": variable, "bigbird": bigbird, "bslongformer": bslongformer}
