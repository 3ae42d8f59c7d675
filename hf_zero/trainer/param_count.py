"""The Trainer's own parameter numbers under hf_zero: the full count, also at stage 3.

At stage 3 a sharded param is a placeholder of 0 elements (its values live in its unit's shards),
so ``p.numel()`` says nothing about the model. The engine knows each sharded param's full shape
(``shard_map`` for trainable params, ``frozen_shard_map`` for frozen ones held in units), so
``full_numels`` maps every param to its true element count and the two numbers the Trainer prints
from the model read right:

* "Number of trainable parameters" in the "Running training" log lines comes from the module
  function ``transformers.trainer.get_model_param_count``, called inside ``_inner_training_loop``
  with no Trainer method around it (it knows only DeepSpeed's ``ds_numel`` attribute). This is
  the one place hf_zero replaces a transformers function: ``counting`` swaps that name in
  ``transformers.trainer`` for the duration of one ``train()`` call (the ``train`` seam) and puts
  the original back after; Trainers without an engine get the original's answer.
* ``total_flos`` (the log's and ``trainer_state.json``'s) sums ``Trainer.floating_point_ops``, which
  multiplies tokens by ``model.num_parameters(exclude_embeddings=True)``: a seam (``seams.py``)
  answers it from ``num_parameters`` below.
"""

from __future__ import annotations

import contextlib
import math
import weakref

from torch import nn

from hf_zero.engine.shard_map import frozen_shard_map

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # engine -> {id(param): full numel}


def full_numels(engine) -> dict[int, int]:
    """id(param) -> its full element count, for every param of ``engine.model`` the engine shards."""
    cached = _CACHE.get(engine)
    if cached is None:
        shapes = {e.name: e.shape for e in [*engine.shard_map(), *frozen_shard_map(engine)]}
        cached = {id(p): math.prod(shapes[name]) for name, p in engine.model.named_parameters() if name in shapes}
        _CACHE[engine] = cached  # the same params for the engine's life (a re-pack keeps shapes)
    return cached


def model_param_count(model: nn.Module, engine, trainable_only: bool = False) -> int:
    """``get_model_param_count`` with full counts: ``model`` may be the wrapped one (ZeroModule)."""
    full = full_numels(engine)
    return sum(full.get(id(p), p.numel()) for p in model.parameters() if not trainable_only or p.requires_grad)


_COUNTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # engine -> {(id(model), exclude): count}


def num_parameters(model: nn.Module, engine, *, exclude_embeddings: bool = False) -> int:
    """``PreTrainedModel.num_parameters(exclude_embeddings=...)`` with full counts (same embedding rule).

    Asked at every step (``floating_point_ops``): counted once per model and engine, whose params
    stay the same for the engine's life (``full_numels``); a walk of the modules cost milliseconds
    of host time a step."""
    counts = _COUNTS.setdefault(engine, {})
    key = (id(model), exclude_embeddings)
    if key not in counts:
        counts[key] = _num_parameters(model, engine, exclude_embeddings)
    return counts[key]


def _num_parameters(model: nn.Module, engine, exclude_embeddings: bool) -> int:
    skip = set()
    if exclude_embeddings:
        skip = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Embedding)}
    full = full_numels(engine)
    return sum(full.get(id(p), p.numel()) for name, p in model.named_parameters() if name not in skip)


@contextlib.contextmanager
def counting(session):
    """For one ``train()`` call: ``transformers.trainer.get_model_param_count`` counts full params of the
    model ``session``'s engine shards (the engine is looked up at each call: it is built inside train)."""
    import transformers.trainer as hf_trainer

    original = hf_trainer.get_model_param_count

    def get_model_param_count(model, trainable_only=False):
        engine = session.engine
        if engine is None:
            return original(model, trainable_only=trainable_only)
        return model_param_count(model, engine, trainable_only=trainable_only)

    hf_trainer.get_model_param_count = get_model_param_count
    try:
        yield
    finally:
        hf_trainer.get_model_param_count = original
