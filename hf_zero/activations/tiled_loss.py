"""``TiledLoss`` (``tiled_loss``): a causal LM's training loss without full-vocabulary logits.

The logits of a causal LM are tokens x vocabulary, upcast to fp32 for the loss: at 128K tokens and a
128K vocabulary that is 64 GiB, more than the rest of the step. The loss only needs, per token, the
log-sum-exp of its logits and the logit of its label, so it can be computed in tiles of tokens: each
tile goes through the LM head and cross entropy (sum) under torch's non-reentrant ``checkpoint``, which
keeps only the tile's hidden states and recomputes its logits in backward, one tile at a time. The
tiles' sums are added and divided as transformers' ``ForCausalLMLoss`` divides: by
``num_items_in_batch`` when the Trainer passes it, else by the count of labels that are not
``ignore_index``. Labels are shifted as there (or ``shift_labels`` taken as given, as sequence
parallelism passes them). DeepSpeed ALST's ``TiledFusedLogitsLoss`` is the same idea as an autograd
Function; checkpoint does its recompute here. The LM head is called as a module, so stage 3's hooks
gather it as for the untiled head, and its weight's gradient is accumulated once (the tiles meet in
one ``AccumulateGrad``).

Exactness: per token the same fp32 cross entropy; the total is summed tile by tile instead of in one
reduction, and the head's weight gradient is summed over tiles: the difference is fp32 reassociation,
at most n * 2**-24 times the sum of the magnitudes for a sum of n terms (n: tokens).

How it reaches the model's forward under the unmodified Trainer (``Trainer.compute_loss`` seam):

1. the seam arms the ``TiledLoss`` for one training call with labels (``armed()``);
2. a forward pre-hook on the LM head (torch's ``register_forward_pre_hook``) captures the hidden states
   it is given and hands the head an empty sequence instead, so the model computes logits of shape
   (batch, 0, vocabulary): nothing (the model's ``logits`` output is that empty tensor, which the
   Trainer's loss path never reads);
3. the model's ``loss_function`` (transformers' own settable hook) is a ``TiledLossFunction``: while a
   capture is held it returns the tiled loss of the captured hidden states, else it is the model's
   original loss function (evaluation, prediction, any forward the seam did not arm).
"""

from __future__ import annotations

import contextlib
import enum
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from hf_zero.activations.tiled_mlp import MODEL_TYPES
from hf_zero.config.auto import AUTO

TILE_LOGIT_BYTES = 1 << 30
""""auto": tiles of at most this many bytes of fp32 logits (ArcticTraining's 1 GiB)."""


class Capture(enum.Enum):
    """IDLE --armed()--> ARMED --head pre-hook--> CAPTURED --loss, or armed() exits--> IDLE"""

    IDLE = "the model's own loss"
    ARMED = "the next LM-head call's input is captured"
    CAPTURED = "hidden states held for the tiled loss"


def tile_count(shards, tokens: int, vocab_size: int) -> int:
    count = math.ceil(tokens * vocab_size * 4 / TILE_LOGIT_BYTES) if shards is AUTO else int(shards)
    return max(1, min(count, tokens))


class TiledLoss:
    """The tiled loss of one causal LM (``lm`` has ``lm_head``, ``config.vocab_size`` and ``loss_function``)."""

    def __init__(self, lm: nn.Module, shards) -> None:
        self.head = lm.lm_head
        self.shards = shards
        self.state = Capture.IDLE
        self._hidden: torch.Tensor | None = None
        self.calls = 0  # tiled losses computed, for tests
        self._original = lm.__dict__.get("_loss_function")  # a loss function someone set before us, if any
        lm.loss_function = TiledLossFunction(self, lm.loss_function)
        self._hook = self.head.register_forward_pre_hook(self._capture)
        self._lm = lm

    def remove(self) -> None:
        self._hook.remove()
        if self._original is None:
            del self._lm._loss_function
        else:
            self._lm.loss_function = self._original

    @contextlib.contextmanager
    def armed(self):
        """The model call inside computes its loss tiled (see the module docstring)."""
        if self.state is not Capture.IDLE:
            raise AssertionError(f"TiledLoss armed while {self.state.value}")
        self.state = Capture.ARMED
        try:
            yield
        finally:
            self.state, self._hidden = Capture.IDLE, None

    def _capture(self, module, args):
        if self.state is not Capture.ARMED:
            return None  # not armed, or a tile's own call of the head
        (hidden,) = args
        self._hidden, self.state = hidden, Capture.CAPTURED
        return (hidden[..., :0, :],)

    def take(self) -> torch.Tensor | None:
        """The captured hidden states (once), or None when this loss call is not a tiled one."""
        if self.state is not Capture.CAPTURED:
            return None
        hidden, self._hidden, self.state = self._hidden, None, Capture.IDLE
        return hidden

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor | None, vocab_size: int,
             num_items_in_batch=None, ignore_index: int = -100, shift_labels: torch.Tensor | None = None,
             **kwargs) -> torch.Tensor:
        """transformers' ``ForCausalLMLoss`` of ``lm_head(hidden)``, tile by tile."""
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = shift_labels.reshape(-1).to(hidden.device)
        tiles = tile_count(self.shards, hidden.shape[0], vocab_size)
        total = None
        for part, target in zip(hidden.chunk(tiles), targets.chunk(tiles)):
            tile = checkpoint(self._tile_loss, part, target, ignore_index, use_reentrant=False)
            total = tile if total is None else total + tile
        self.calls += 1
        if num_items_in_batch is None:
            return total / (targets != ignore_index).sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    def _tile_loss(self, hidden: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        logits = self.head(hidden).float()
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")


class TiledLossFunction:
    """What the model's ``loss_function`` is while the tiled loss is installed (see the module docstring)."""

    def __init__(self, tiled: TiledLoss, original) -> None:
        self.tiled = tiled
        self.original = original

    def __call__(self, logits, labels, vocab_size, **kwargs):
        hidden = self.tiled.take()
        if hidden is None:
            return self.original(logits, labels, vocab_size, **kwargs)
        return self.tiled.loss(hidden, labels, vocab_size, **kwargs)


def causal_lm(model: nn.Module) -> nn.Module:
    """The Llama/Mistral/Qwen2/Qwen3 causal LM inside ``model`` (itself, or under a PEFT wrapper)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "model_type", None) in MODEL_TYPES and isinstance(getattr(module, "lm_head", None),
                                                                             nn.Linear):
            return module
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ValueError(f"tiled_loss: no causal LM head to tile in a {kind!r} model; tiled_loss applies to "
                     f"{', '.join(m + 'ForCausalLM' for m in ('Llama', 'Mistral', 'Qwen2', 'Qwen3'))}; remove "
                     "the tiled_loss block for this model")


__all__ = ["Capture", "TiledLoss", "TiledLossFunction", "causal_lm", "tile_count"]
