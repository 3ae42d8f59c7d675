"""Putting ``CheckpointOffload`` around the checkpoint calls of a transformers model's layers.

transformers' ``activation_checkpointing_enable`` (the Trainer calls it in ``train()`` when
``--gradient_checkpointing`` is on) stores the checkpoint function on every module that has a
``gradient_checkpointing`` flag, as the instance attribute ``_gradient_checkpointing_func`` (a
``functools.partial`` of ``torch.utils.checkpoint.checkpoint`` with ``use_reentrant``), and each
``GradientCheckpointingLayer`` calls it with its forward. ``wrap_layers`` replaces that attribute with
an ``OffloadedCheckpoint`` holding the original: the same call inside ``with offload:``. torch and the
layers' classes are not touched; ``unwrap_layers`` puts the originals back.
"""

from __future__ import annotations

from torch import nn

from hf_zero.activations.checkpoint_offload import CheckpointOffload

ATTRIBUTE = "_gradient_checkpointing_func"


class OffloadedCheckpoint:
    """A layer's checkpoint function, called with ``offload``'s saved-tensor hooks active."""

    def __init__(self, inner, offload: CheckpointOffload) -> None:
        self.inner = inner
        self.offload = offload

    def __call__(self, function, *args, **kwargs):
        with self.offload:
            return self.inner(function, *args, **kwargs)


def wrap_layers(model: nn.Module, offload: CheckpointOffload) -> int:
    """Wrap the checkpoint function of every module of ``model`` that checkpoints; how many were wrapped.

    Idempotent: a function already wrapped (by this or an earlier offload) is re-wrapped around its
    original, so a second ``train()`` (which sets the functions again) or a second call does not nest."""
    wrapped = 0
    for module in model.modules():
        inner = module.__dict__.get(ATTRIBUTE)
        if inner is None or not getattr(module, "gradient_checkpointing", False):
            continue
        if isinstance(inner, OffloadedCheckpoint):
            inner = inner.inner
        setattr(module, ATTRIBUTE, OffloadedCheckpoint(inner, offload))
        wrapped += 1
    return wrapped


def unwrap_layers(model: nn.Module) -> None:
    """Put back every checkpoint function ``wrap_layers`` replaced."""
    for module in model.modules():
        inner = module.__dict__.get(ATTRIBUTE)
        if isinstance(inner, OffloadedCheckpoint):
            setattr(module, ATTRIBUTE, inner.inner)


__all__ = ["OffloadedCheckpoint", "unwrap_layers", "wrap_layers"]
