"""Activation memory at long sequences: ZeRO-R's CPU checkpointing and ALST's tiled compute.

Module map: ``host_buffers`` (bounded, reused host buffers), ``checkpoint_offload`` (the saved-tensor
hooks that move checkpointed layers' inputs to the host and prefetch them back), ``checkpoint_layers``
(putting them around a transformers model's checkpoint calls), ``tiled_mlp`` and ``tiled_loss`` (the MLP
and the causal-LM loss in sequence tiles), ``trainer_activations`` (what one Trainer's config does, and
when). Settings: ``hf_zero/config/activations.py``; docs: docs/long-sequences.md.
"""

from hf_zero.activations.checkpoint_offload import CheckpointOffload
from hf_zero.activations.tiled_loss import TiledLoss
from hf_zero.activations.tiled_mlp import TiledMLP
from hf_zero.activations.trainer_activations import TrainerActivations

__all__ = ["CheckpointOffload", "TiledLoss", "TiledMLP", "TrainerActivations"]
