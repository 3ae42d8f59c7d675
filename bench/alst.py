"""DeepSpeed ALST on one GPU, as a user adds it to a Trainer script (`job.py --alst`).

transformers and accelerate wire only ALST's Ulysses attention into the Trainer
(`ParallelismConfig(sp_backend="deepspeed", sp_size=N)`, N > 1, so never on one GPU); their docs
say TiledMLP and activation-checkpoint offload are not in transformers. ALST's single-GPU recipe
(arXiv 2506.13996: TiledMLP, a tiled logits + loss, checkpoints offloaded to the host, on top of
ZeRO-3 with CPU offload) is therefore code in the user's script, written here the way
ArcticTraining (ALST's reference trainer) writes it, with DeepSpeed 0.19.8's own pieces:

- tiled MLP (`ulysses_sp.TiledMLP`): each decoder layer's `mlp.forward` (an instance attribute;
  ArcticTraining patches the class) runs `TiledMLP.apply` with ALST's rule
  `shards = ceil(seq / hidden)`.
- tiled loss (`ulysses_sp.TiledFusedLogitsLoss`): inside the model's forward, so inside
  DeepSpeed's `engine.forward`, whose output hooks run DeepSpeed 0.19.8's backward prologue
  (ArcticTraining calls `model.model` outside the engine, which would skip it). `compute_loss`
  asks for no logits (`logits_to_keep` an empty index), a forward hook on the decoder keeps its
  last hidden states, and the model's `loss_function` (transformers' settable hook) runs the LM
  head and the original loss on them in tiles of at most 1 GiB of fp32 logits (ArcticTraining's
  rule); each tile returns its share of the mean over the sequence's labels (`_loss_share`).
- checkpoint offload (`offload_activations.get_checkpoint_hidden_states_offloading_ctx_manager`):
  wraps each `training_step` (forward and backward); every checkpointed decoder layer's input
  goes to pinned host memory on a side stream. DeepSpeed's ALST tutorial gives it for Hugging
  Face non-reentrant checkpointing: 0.19.8's engine applies the JSON's
  `activation_checkpointing.cpu_checkpointing` only to `deepspeed.checkpointing.checkpoint`,
  which transformers does not call.

ZeRO-3 with parameter and optimizer offload comes from the DeepSpeed JSON (`--deepspeed`), and
`--gradient_checkpointing` with `use_reentrant: false` from the Trainer's own flags.
"""

from __future__ import annotations

import math
import types

import torch
from transformers import Trainer

LOGITS_TILE_BYTES = 1 << 30  # ArcticTraining: about 1 GiB of fp32 logits a tile


def _mlp_math(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaMLP's forward, through the submodules so ZeRO-3's hooks gather their weights."""
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def _tiled_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = math.ceil(x.shape[-2] / x.shape[-1])  # ALST's "auto": ceil(seqlen / hidden)
    params = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    return TiledMLP.apply(_mlp_math, mlp, x, shards, params)


def apply_tiled_mlp(model: torch.nn.Module) -> int:
    """Route every decoder layer's MLP through TiledMLP; returns how many were routed."""
    layers = model.model.layers
    for layer in layers:
        layer.mlp.forward = types.MethodType(_tiled_mlp_forward, layer.mlp)
    return len(layers)


def loss_shards(tokens: int, vocab_size: int) -> int:
    """Tiles of at most LOGITS_TILE_BYTES of fp32 logits."""
    return max(1, math.ceil(tokens * vocab_size * 4 / LOGITS_TILE_BYTES))


def _loss_share(tiled: "TiledLoss", total_labels: torch.Tensor):
    """One tile's share of the mean loss: LM head, the model's own causal-LM loss (a mean over the
    tile's labels) times the tile's label count, over the whole sequence's label count. The tiles'
    shares sum to the untiled mean, and the weight gradients TiledFusedLogitsLoss accumulates
    during its forward are those of that mean (with "sum" its incoming gradient is 1; dividing the
    summed loss afterwards, as ArcticTraining does, would scale the input's gradient but not the
    LM head's, which is already accumulated)."""

    def share(model: torch.nn.Module, hidden: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(hidden)
        good = (shift_labels != -100).sum()
        if good == 0:  # cross entropy over no labels is nan; keep the graph, add nothing
            return (logits.sum() * 0.0).float()
        loss = tiled.original(logits=logits, labels=None, vocab_size=model.config.vocab_size,
                              shift_labels=shift_labels)
        return loss * good / total_labels

    return share


class TiledLoss:
    """The model's `loss_function` replaced by ALST's tiled loss over the decoder's last hidden
    states, which a forward hook on the decoder keeps until the loss takes them."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.original = model, model.loss_function
        self.hidden: torch.Tensor | None = None
        model.model.register_forward_hook(self._keep_hidden)
        model.loss_function = self

    def _keep_hidden(self, module, args, output) -> None:
        self.hidden = output.last_hidden_state

    def __call__(self, logits, labels, vocab_size, **kwargs) -> torch.Tensor:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

        hidden, self.hidden = self.hidden, None
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        total = (shift_labels != -100).sum().clamp(min=1)
        shards = loss_shards(shift_labels.numel(), vocab_size)
        head = self.model.lm_head
        return TiledFusedLogitsLoss.apply(_loss_share(self, total), self.model, hidden, shift_labels, None, shards,
                                          [head.weight], "sum")


def apply_alst(model: torch.nn.Module) -> None:
    """TiledMLP on every decoder MLP and the tiled loss as the model's loss function."""
    apply_tiled_mlp(model)
    TiledLoss(model)


class AlstTrainer(Trainer):
    """The Trainer asking the model for no logits (the tiled loss needs none), with DeepSpeed's
    checkpoint offload around each training step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            # DeepSpeed scales the loss by 1/accumulation in backward: that reaches the hidden
            # states' gradient but not the LM head's, which the tiled loss accumulates in forward
            raise ValueError(f"--alst needs --gradient_accumulation_steps 1, got {self.args.gradient_accumulation_steps}")
        from deepspeed.runtime.activation_checkpointing.offload_activations import (
            get_checkpoint_hidden_states_offloading_ctx_manager,
        )

        self.checkpoint_offload = get_checkpoint_hidden_states_offloading_ctx_manager()

    def training_step(self, *args, **kwargs):
        # forward and backward of one micro-batch inside the same offload context (DeepSpeed's rule)
        with self.checkpoint_offload:
            return super().training_step(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and "labels" in inputs:
            no_logits = torch.empty(0, dtype=torch.long, device=inputs["labels"].device)
            inputs = {**inputs, "logits_to_keep": no_logits}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
