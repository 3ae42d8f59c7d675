"""The dtype of offloaded optimizer state: fp32 (default), or bf16 kept between steps.

[Note: bf16 host state] With ``offload_optimizer.state_dtype = "bf16"`` the per-element optimizer
state of offloaded buckets (AdamW's ``exp_avg`` and ``exp_avg_sq``; any floating state tensor with
one value per element) lives in host memory as bf16 between steps; the fp32 masters stay fp32 (as
DeepSpeed's ``bf16.bf16_optimizer_states`` with CPU offload, 0.19.1). Per offloaded element the
host then holds 4 (master) + 2 x 2 (moments) + 4 (grad) = 12 bytes instead of 16, and the step
reads and writes 20 bytes of memory instead of 28. With device "nvme" the swap files and their
chunk buffers hold the moments in bf16 too (8 bytes per element on disk and moved each way instead
of 12, [Note: bf16 swap files] in nvme_swap.py), and the step below is the same, bit for bit.

The math is the fp32 step's: the user's own optimizer steps fp32 values, the moments upcast
(exactly) before the update and rounded back to bf16 (to nearest, ties to even: ``copy_``) after
it. Only the rounding changes numerics, once per step and element: a relative error of at most
2^-9 in each stored moment. Rounding is deterministic, not stochastic, so a step redone from its
copy (speculation.py) or run twice gives the same bits, and a run is reproducible.

So that the fp32 values never exist for a whole chunk (they would cost the bytes saved, and
more), a chunk is stepped in *sub-steps* of at most ``SUB_NUMEL`` elements: each takes consecutive
ranges of the chunk's pieces, upcasts their state into an fp32 scratch small enough to stay in
the CPU's cache, steps temporary parameters over those ranges of the masters (the optimizer's
``state`` swapped for one that holds the scratch), and rounds the scratch back::

    piece p (master slice, fp32)   [...................................]
    p's exp_avg (bf16)             [.........|.........|.........|....]
    sub-step k:                     upcast [a,b) -> scratch; step; round scratch -> [a,b)

Scalars (AdamW's ``step``) are the optimizer's own, carried through each sub-step. State that
arrives in fp32 (a checkpoint written with fp32 state, or the first step's fresh state) is rounded
once, the first time its piece is stepped. The device's own optimizer state (``ratio`` < 1) is
not touched: it stays fp32.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch
from torch import nn

STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SUB_NUMEL = 1 << 20  # elements per sub-step: 4 MiB of fp32 scratch per state tensor (in a server's L2 + L3)


def per_element(value, piece: torch.Tensor) -> bool:
    """Whether optimizer state ``value`` has one floating value per element of ``piece``."""
    return (torch.is_tensor(value) and value.dim() > 0 and value.numel() == piece.numel()
            and value.is_floating_point())


class LowPrecisionState:
    """Steps chunks of offloaded pieces whose per-element state is kept in ``dtype`` ([Note: bf16
    host state]). One per host step; ``step`` may run on the step worker or the main thread (never
    both at once; each thread has its own scratch all the same)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, sub_numel: int | None = None) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"low-precision optimizer state must be bfloat16 or float16, got {dtype}")
        self.dtype, self.sub_numel = dtype, sub_numel or SUB_NUMEL
        self._local = threading.local()

    @torch.no_grad()
    def step(self, view: torch.optim.Optimizer, groups: list[dict], pieces: list) -> None:
        """One step of ``view`` over ``pieces`` (those with a grad; the rest are left alone) with
        the hyperparameters of ``groups``, their per-element state kept in ``self.dtype``."""
        state = view.state
        stepped = [p for p in pieces if p.grad is not None]
        for piece in stepped:
            self.round_stored(state.get(piece), piece)
        member = {id(p): k for k, g in enumerate(groups) for p in g["params"]}
        # Each piece's state as the step found it (None: a fresh piece, the optimizer makes its
        # own): every sub-step of a piece starts from it, whatever an earlier one wrote back.
        before = {id(p): dict(state[p]) if state.get(p) else None for p in stepped}
        try:
            for ranges in self._sub_steps(stepped):
                self._sub_step(view, groups, member, state, before, ranges)
        finally:
            view.state = state

    def round_stored(self, saved: dict | None, piece: torch.Tensor) -> None:
        """Per-element state of ``piece`` that is not in ``self.dtype`` yet, rounded to it."""
        for key, value in (saved or {}).items():
            if per_element(value, piece) and value.dtype != self.dtype:
                saved[key] = value.to(self.dtype)

    def _sub_steps(self, pieces: list):
        """Lists of (piece, start, end), at most ``sub_numel`` elements in each, in piece order."""
        ranges, room = [], self.sub_numel
        for piece in pieces:
            start, n = 0, piece.numel()
            while start < n:
                end = min(n, start + room)
                ranges.append((piece, start, end))
                room -= end - start
                start = end
                if room == 0:
                    yield ranges
                    ranges, room = [], self.sub_numel
        if ranges:
            yield ranges

    def _sub_step(self, view, groups: list[dict], member: dict, state: dict, before: dict, ranges: list) -> None:
        temps, temp_state, at = [], defaultdict(dict), 0
        for piece, a, b in ranges:
            temp = nn.Parameter(piece.detach()[a:b])  # a view of the master: the step writes it
            temp.grad = piece.grad[a:b]
            saved = before[id(piece)]
            if saved is not None:  # upcast into the scratch
                temp_state[temp] = {k: self._scratch(k)[at : at + b - a].copy_(v[a:b]) if per_element(v, piece)
                                    else (v.clone() if torch.is_tensor(v) else v) for k, v in saved.items()}
            temps.append(temp)
            at += b - a
        view.state = temp_state
        view.param_groups = [{**g, "params": [t for t, (p, _, _) in zip(temps, ranges) if member[id(p)] == k]}
                             for k, g in enumerate(groups)]
        view.step()
        for temp, (piece, a, b) in zip(temps, ranges):
            saved = state.setdefault(piece, {})
            for key, value in temp_state[temp].items():
                if not per_element(value, temp):
                    saved[key] = value  # AdamW's step: the same after every sub-step of the piece
                    continue
                kept = saved.get(key)
                if kept is None or kept.dtype != self.dtype or kept.numel() != piece.numel():
                    kept = saved[key] = torch.empty(piece.numel(), dtype=self.dtype)  # a fresh piece
                kept[a:b].copy_(value)  # rounded to nearest

    def _scratch(self, key: str) -> torch.Tensor:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        if key not in buffers:
            buffers[key] = torch.empty(self.sub_numel, dtype=torch.float32)
        return buffers[key]
