"""``TiledMLP`` (``tiled_mlp``): a decoder MLP run in sequence tiles, one tile's intermediate live at a time.

At long sequences a decoder layer's largest activations are its MLP's: gate, up and their product are
sequence x intermediate_size each (3.5x hidden for Llama-8B). The MLP is position-wise, so it can run
on tiles of the sequence. Each tile runs under torch's non-reentrant ``checkpoint``: forward keeps only
the tile's input, and backward recomputes one tile's intermediate, uses it and frees it before the next
tile's (autograd runs the later tile's nodes first, one chain at a time). The output (sequence x hidden)
is whole, as untiled.

DeepSpeed ALST's ``TiledMLP`` is an autograd Function that recomputes tiles in its backward and
signals ZeRO-3 per tile; here torch's ``checkpoint`` does the recompute (RNG, autocast and nested
checkpointing included), and every parameter's ``AccumulateGrad`` still runs once per backward (the
tiles' gradients meet in one node, as for an untiled MLP), so the engine's gradient hooks see what they
see untiled.

Exactness: every output element and every gradient is the same sum of products as untiled, summed in
another order (the tiles' weight gradients are added tile by tile; a matmul over fewer rows may block
its inner sums differently). In fp32 the difference of a sum of n terms is at most n * 2**-24 times the
sum of the terms' magnitudes (n: tokens for weight gradients, hidden or intermediate size otherwise);
tests/activations/test_tiled_mlp.py holds it to that bound.

How it is applied: ``tile_mlps`` sets the instance attribute ``forward`` of each decoder layer's ``mlp``
to a ``TiledMLP`` holding the class's own forward; ``nn.Module.__call__`` finds the instance attribute
first, so hooks, parameter names and state dicts are unchanged, and ``untile_mlps`` deletes it again.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hf_zero.config.auto import AUTO

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Models whose decoder layers' ``mlp`` is position-wise (gate/up/down projections): the ones tiled."""


def tile_count(shards, tokens: int, hidden_size: int) -> int:
    """Tiles for ``tokens`` positions: ``shards``, or "auto": ceil(tokens / hidden_size) (DeepSpeed ALST's
    rule), never more than ``tokens``."""
    count = math.ceil(tokens / hidden_size) if shards is AUTO else int(shards)
    return max(1, min(count, tokens))


class TiledMLP:
    """One MLP's forward, in tiles along the sequence (dimension -2) of its input."""

    def __init__(self, mlp: nn.Module, shards) -> None:
        self.forward = type(mlp).forward.__get__(mlp)  # the class's own forward, bound to mlp
        self.shards = shards
        self.hidden_size = mlp.hidden_size if hasattr(mlp, "hidden_size") else mlp.config.hidden_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tiles = tile_count(self.shards, x.shape[-2], self.hidden_size) if x.dim() >= 2 else 1
        if tiles == 1:
            return self.forward(x)
        parts = x.chunk(tiles, dim=-2)
        if torch.is_grad_enabled():
            outs = [checkpoint(self.forward, part, use_reentrant=False) for part in parts]
        else:
            outs = [self.forward(part) for part in parts]
        return torch.cat(outs, dim=-2)


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """The ``mlp`` of every decoder layer of the Llama/Mistral/Qwen2/Qwen3 models inside ``model``."""
    mlps = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "model_type", None) in MODEL_TYPES and isinstance(getattr(module, "layers", None),
                                                                             nn.ModuleList):
            mlps += [layer.mlp for layer in module.layers if isinstance(getattr(layer, "mlp", None), nn.Module)]
    return mlps


def require_mlps(model: nn.Module) -> list[nn.Module]:
    """``decoder_mlps(model)``, refusing a model that has none (the key named, the models it applies to)."""
    mlps = decoder_mlps(model)
    if not mlps:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"tiled_mlp: no decoder MLP to tile in a {kind!r} model; tiled_mlp applies to the decoder "
                         f"layers of {', '.join(MODEL_TYPES)} models; remove the tiled_mlp block for this model")
    return mlps


def tile_mlps(model: nn.Module, shards) -> int:
    """Give every decoder MLP of ``model`` a ``TiledMLP`` forward (again, if it had one); how many."""
    mlps = require_mlps(model)
    for mlp in mlps:
        mlp.forward = TiledMLP(mlp, shards)
    return len(mlps)


def untile_mlps(model: nn.Module) -> None:
    for mlp in decoder_mlps(model):
        if isinstance(mlp.__dict__.get("forward"), TiledMLP):
            del mlp.forward


__all__ = ["MODEL_TYPES", "TiledMLP", "decoder_mlps", "require_mlps", "tile_count", "tile_mlps", "untile_mlps"]
