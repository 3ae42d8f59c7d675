"""A Hugging Face decoder model split at decoder-layer boundaries into pipeline pieces.

A Llama-like causal LM (Llama, Mistral, Qwen2, ...: ``model.<base>.embed_tokens``, ``.layers``,
``.norm``, ``.rotary_emb`` and ``model.lm_head``) is cut into ``pieces`` contiguous runs of decoder
layers, as evenly as possible (earlier pieces take one more where the count does not divide)::

    10 layers, 4 pieces:   piece 0: layers 0-2 (+ embed_tokens)   piece 1: 3-5   piece 2: 6-7
                           piece 3: layers 8-9 (+ norm, lm_head, the loss)

A rank holds piece ``r`` (1F1B, GPipe), or pieces ``r`` and ``r + stages`` (interleaved 1F1B: two
virtual stages per rank). ``prune`` drops every other layer from the model in place: the kept
layers stay at their own names (``model.layers.5.mlp...``, in a ``ModuleDict`` keyed by the
original index), so the optimizer, ZeRO and checkpoints see the original parameter names, and
``save_model`` writes full weights by putting every stage's names together.

``StagePiece`` is what ``torch.distributed.pipelining.PipelineStage`` runs: the first piece takes
``input_ids``, the others the hidden states; each computes the rotary embedding and the attention
mask itself from the sequence length and the batch's ``attention_mask`` (passed to every stage), so
only hidden states travel between stages.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import nn

KEY = "pipeline.stages"


class NotSplittable(ValueError):
    """The model cannot be split into pipeline stages; the message names the reason."""


class Decoder(NamedTuple):
    """Where a Llama-like causal LM keeps the parts a pipeline split moves."""

    base: nn.Module  # model.model: embed_tokens, layers, norm, rotary_emb
    lm_head: nn.Module
    num_layers: int


def find_decoder(model: nn.Module, stages: int) -> Decoder:
    """The decoder parts of ``model``, or ``NotSplittable`` naming what is missing or in the way."""
    name = type(model).__name__
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    missing = [f"{getattr(model, 'base_model_prefix', 'model')}.{a}" for a in ("embed_tokens", "layers", "norm",
                                                                              "rotary_emb")
               if base is None or not isinstance(getattr(base, a, None), nn.Module)]
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        missing.append("lm_head")
    if missing:
        raise NotSplittable(f"{KEY} = {stages}: {name} is not a decoder model hf_zero can split (it lacks "
                            f"{', '.join(missing)}); allowed: Llama-like causal LMs (Llama, Mistral, Qwen2, ...) "
                            "whose forward is embeddings, a list of decoder layers, a final norm and an LM head")
    if not isinstance(base.layers, nn.ModuleList):
        raise NotSplittable(f"{KEY} = {stages}: {name}'s decoder layers are a {type(base.layers).__name__}, not a "
                            "ModuleList (split already, or a custom forward)")
    if model.lm_head.weight is base.embed_tokens.weight:
        raise NotSplittable(f"{KEY} = {stages}: {name} ties lm_head to embed_tokens (tie_word_embeddings true), "
                            "and the two live on the first and the last stage; untie them (tie_word_embeddings "
                            "false) or train without pipeline stages")
    return Decoder(base, model.lm_head, len(base.layers))


def layer_ranges(num_layers: int, pieces: int) -> list[range]:
    """``pieces`` contiguous runs of layers, as even as possible, earlier runs one longer."""
    if pieces > num_layers:
        raise NotSplittable(f"{KEY}: {pieces} pipeline pieces for {num_layers} decoder layers; each piece needs at "
                            f"least one layer (interleaved_1F1B holds two pieces per stage); allowed: pieces <= "
                            f"{num_layers}")
    size, extra = divmod(num_layers, pieces)
    starts = [i * size + min(i, extra) for i in range(pieces + 1)]
    return [range(starts[i], starts[i + 1]) for i in range(pieces)]


def prune(model: nn.Module, decoder: Decoder, keep: list[range], *, first: bool, last: bool) -> None:
    """In place: ``model`` keeps only the layers in ``keep`` (at their original names), the embeddings
    only if ``first``, the final norm and LM head only if ``last``."""
    kept = {str(i): decoder.base.layers[i] for r in keep for i in r}
    decoder.base.layers = nn.ModuleDict(kept)
    if not first:
        decoder.base.embed_tokens = None
    if not last:
        decoder.base.norm = None
        model.lm_head = None


class StagePiece(nn.Module):
    """One pipeline piece of a pruned model: what a ``PipelineStage`` runs."""

    def __init__(self, model: nn.Module, decoder: Decoder, layers: range, *, first: bool, last: bool) -> None:
        super().__init__()
        self.model = model  # the pruned HF model: its params keep their names
        self._base = decoder.base
        self.layer_ids = [str(i) for i in layers]
        self.first, self.last = first, last
        config = model.config
        self._config = config
        self._layer_types = getattr(config, "layer_types", None)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        base = self._base
        hidden = base.embed_tokens(x) if self.first else x
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        position_embeddings = base.rotary_emb(hidden, position_ids)
        masks = _masks(self._config, hidden, attention_mask, position_ids,
                       {self._layer_type(i) for i in self.layer_ids})
        for i in self.layer_ids:
            out = base.layers[i](hidden, attention_mask=masks[self._layer_type(i)], position_ids=position_ids,
                                 position_embeddings=position_embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        if self.last:
            hidden = self.model.lm_head(base.norm(hidden))
        return hidden

    def _layer_type(self, i: str) -> str:
        return self._layer_types[int(i)] if self._layer_types else "full_attention"


def _masks(config, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
           kinds: set[str]) -> dict:
    """The attention mask of each layer type, as the model's own forward builds them (transformers'
    masking_utils, whose argument names differ between transformers releases)."""
    from transformers import masking_utils

    makers = {"full_attention": masking_utils.create_causal_mask,
              "sliding_attention": masking_utils.create_sliding_window_causal_mask}
    out = {}
    for kind in kinds:
        if kind not in makers:
            raise NotSplittable(f"{KEY}: decoder layers of type {kind!r} are not built for pipeline stages yet; "
                                f"allowed: {sorted(makers)}")
        make = makers[kind]
        params = inspect.signature(make).parameters
        kw = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids,
              ("inputs_embeds" if "inputs_embeds" in params else "input_embeds"): hidden}
        kw["cache" if "cache" in params else "past_key_values"] = None
        if "cache_position" in params:
            kw["cache_position"] = position_ids[0]
        out[kind] = make(**kw)
    return out
