"""DeepSpeed ALST on one GPU, as a user adds it to a Trainer script (`job.py --alst`).

transformers and accelerate wire only ALST's Ulysses attention into the Trainer
(`ParallelismConfig(sp_backend="deepspeed", sp_size=N)`, N > 1, so never on one GPU); their docs
say TiledMLP and activation-checkpoint offload are not in transformers. ALST's single-GPU recipe
(arXiv 2506.13996: TiledMLP, a tiled logits + loss, checkpoints offloaded to the host, on top of
ZeRO-3 with CPU offload) is therefore code in the user's script, written here the way
ArcticTraining (ALST's reference trainer) writes it, with DeepSpeed 0.19.8's own pieces:

| piece | DeepSpeed 0.19.8 API | how this script applies it |
|---|---|---|
| tiled MLP | `ulysses_sp.TiledMLP` | each decoder layer's `mlp.forward` (an instance attribute; ArcticTraining patches the class) runs `TiledMLP.apply` with ALST's rule `shards = ceil(seq / hidden)` |
| tiled loss | `ulysses_sp.TiledFusedLogitsLoss` | `compute_loss` runs the decoder (`model.model`) for the hidden states and the LM head + the model's `loss_function` in tiles of at most 1 GiB of fp32 logits (ArcticTraining's rule); each tile returns its share of the mean over the sequence's labels (see `_loss_share`) |
| checkpoint offload | `offload_activations.get_checkpoint_hidden_states_offloading_ctx_manager()` | wraps each `training_step` (forward and backward): every checkpointed decoder layer's input goes to pinned host memory on a side stream (DeepSpeed's tutorial: the way for HF non-reentrant checkpointing; 0.19.8's engine does not apply the JSON's `activation_checkpointing.cpu_checkpointing` to HF checkpointing, which calls torch's checkpoint, not DeepSpeed's) |

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


def _loss_share(total_labels: torch.Tensor):
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
        loss = model.loss_function(logits=logits, labels=None, vocab_size=model.config.vocab_size,
                                   shift_labels=shift_labels)
        return loss * good / total_labels

    return share


class AlstTrainer(Trainer):
    """The Trainer with ALST's tiled loss and DeepSpeed's checkpoint offload around each step."""

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
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

        if return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        lm = self.accelerator.unwrap_model(model)
        labels = inputs["labels"]
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        hidden = lm.model(input_ids=inputs["input_ids"], use_cache=False).last_hidden_state
        shards = loss_shards(shift_labels.numel(), lm.config.vocab_size)
        total = (shift_labels != -100).sum().clamp(min=1)
        return TiledFusedLogitsLoss.apply(
            _loss_share(total), lm, hidden, shift_labels, None, shards, [lm.lm_head.weight], "sum"
        )
