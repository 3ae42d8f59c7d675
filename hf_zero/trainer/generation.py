"""Stage 3, W > 1: the model's ``generate()`` keeps every rank decoding for the same number of steps.

Each decoding step's forward all-gathers every unit, so a rank that finishes early (a shorter
prompt batch, ``max_new_tokens``, its EOS) must keep running forwards until every rank is done,
or the others wait in a gather it never joins. transformers does exactly that with
``synced_gpus=True``, but defaults to it only under DeepSpeed ZeRO-3 or FSDP, and
``GenerationConfig`` refuses the key. So the model hf_zero shards gets an instance-level
``generate`` (the class's ``generate`` is untouched, and so is every other model) that passes
``synced_gpus=True`` unless the caller passes ``synced_gpus`` itself. ``Seq2SeqTrainer`` sets it
in ``prediction_step`` as well (``seams.py``).
"""

from __future__ import annotations

import types

# generate(inputs, generation_config, logits_processor, stopping_criteria, prefix_allowed_tokens_fn,
#          synced_gpus, ...): positional arguments up to here leave synced_gpus to the keywords.
_SYNCED_GPUS_POSITION = 5


def generate(self, *args, **kwargs):
    """``type(self).generate`` with ``synced_gpus=True`` unless the caller chose."""
    if len(args) <= _SYNCED_GPUS_POSITION and kwargs.get("synced_gpus") is None:
        kwargs["synced_gpus"] = True
    return type(self).generate(self, *args, **kwargs)


def sync_generate(model) -> None:
    """Give ``model`` (sharded at stage 3 over more than one rank) the synced ``generate``; idempotent.

    A bound method (not a closure), so ``copy.deepcopy(model)`` binds the copy's to the copy."""
    if callable(getattr(type(model), "generate", None)) and "generate" not in vars(model):
        model.generate = types.MethodType(generate, model)
