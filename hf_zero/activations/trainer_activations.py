"""``TrainerActivations``: what one Trainer's config does to its model's activations, and when.

Made by the ``Trainer.__init__`` seam for every Trainer with a ZeroSession (every stage, 0 included);
everything it refuses is refused there, before any step. It acts at two points of ``train()``:

| when | what |
|---|---|
| ``on_train_begin`` (after the Trainer enabled gradient checkpointing) | ``cpu_checkpointing``: every checkpointing layer's checkpoint function runs inside one ``CheckpointOffload`` (checkpoint_layers.py); ``tiled_mlp``: decoder MLPs get a ``TiledMLP`` forward; ``tiled_loss``: the causal LM gets a ``TiledLoss`` |
| ``Trainer.compute_loss`` seam | ``tiled_loss``: the training forward with labels computes its loss tiled (``loss_context``) |
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from hf_zero.activations.checkpoint_layers import wrap_layers
from hf_zero.activations.checkpoint_offload import CheckpointOffload
from hf_zero.activations.host_buffers import HostBuffers
from hf_zero.activations.tiled_loss import TiledLoss, causal_lm
from hf_zero.activations.tiled_mlp import require_mlps, tile_mlps


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


class TrainerActivations(TrainerCallback):
    """The activation settings of one Trainer (see the module docstring)."""

    def __init__(self, config: Any, args: Any, model: torch.nn.Module) -> None:
        self.config = config
        self.settings = config.activation_checkpointing
        self.offload: CheckpointOffload | None = None
        self.tiled_loss: TiledLoss | None = None
        self._check(args, model)

    @property
    def active(self) -> bool:
        """Whether this config asks for anything (else the Trainer needs neither callback nor seam)."""
        return self.settings.cpu_checkpointing or self.config.tiled_mlp is not None or \
            self.config.tiled_loss is not None

    def _check(self, args: Any, model: torch.nn.Module) -> None:
        where = _where(self.config.source)
        settings = self.settings
        if settings.cpu_checkpointing:
            if not args.gradient_checkpointing:
                raise ValueError(f"activation_checkpointing.cpu_checkpointing = true{where} but "
                                 "TrainingArguments.gradient_checkpointing is false: nothing is checkpointed, so "
                                 "there is nothing to move to the host; pass --gradient_checkpointing, or set "
                                 "cpu_checkpointing to false")
            kwargs = args.gradient_checkpointing_kwargs or {}
            if isinstance(kwargs, dict) and kwargs.get("offload"):
                raise ValueError(f"activation_checkpointing.cpu_checkpointing = true{where} and "
                                 "TrainingArguments.gradient_checkpointing_kwargs offload = true both move "
                                 "checkpoints to the host; keep one (hf_zero's copies run off the compute stream "
                                 "and are prefetched)")
        elif settings.contiguous_memory_optimization or settings.number_checkpoints is not None \
                or settings.device_checkpoints:
            warnings.warn(f"activation_checkpointing.contiguous_memory_optimization / number_checkpoints / "
                          f"device_checkpoints{where} "
                          "apply only with cpu_checkpointing = true (hf_zero's pinned host buffers); on the "
                          "accelerator checkpoints live in torch's caching allocator (expandable_segments in "
                          "PYTORCH_CUDA_ALLOC_CONF is its defragmentation). Not applied.", stacklevel=3)
        if self.config.tiled_mlp is not None:
            require_mlps(model)
        if self.config.tiled_loss is not None:
            causal_lm(model)  # raises for a model without a tileable head
            if args.label_smoothing_factor:
                raise ValueError(f"tiled_loss{where} with TrainingArguments.label_smoothing_factor = "
                                 f"{args.label_smoothing_factor}: the Trainer then computes the loss from full "
                                 "logits itself; remove the tiled_loss block or the label smoothing")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.settings.cpu_checkpointing:
            if self.offload is None:
                buffers = HostBuffers(pin=args.device.type == "cuda", slots=self.settings.number_checkpoints,
                                      contiguous=self.settings.contiguous_memory_optimization)
                self.offload = CheckpointOffload(args.device, buffers, on_device=self.settings.device_checkpoints)
            if wrap_layers(model, self.offload) == 0:
                raise ValueError(f"activation_checkpointing.cpu_checkpointing = true{_where(self.config.source)}: "
                                 f"{type(model).__name__} has no layer that checkpoints (transformers' "
                                 "GradientCheckpointingLayer) to offload")
        if self.config.tiled_mlp is not None:
            tile_mlps(model, self.config.tiled_mlp.shards)
        if self.config.tiled_loss is not None and self.tiled_loss is None:
            self.tiled_loss = TiledLoss(causal_lm(model), self.config.tiled_loss.shards)

    def loss_context(self, trainer: Any, model: torch.nn.Module, inputs: dict, return_outputs: bool):
        """Around ``Trainer.compute_loss``: the tiled loss for a training forward whose loss is the model's.

        ``return_outputs`` does not matter: evaluation and prediction (which ask for outputs) run with the
        model in eval mode; a training call that asks for them (sequence parallelism's per-batch mean does)
        gets the outputs with empty logits, as the loss never needed full ones."""
        tiled = self.tiled_loss
        if tiled is None or not model.training or "labels" not in inputs \
                or trainer.compute_loss_func is not None or trainer.label_smoother is not None:
            return contextlib.nullcontext()
        return tiled.armed()


__all__ = ["TrainerActivations"]
