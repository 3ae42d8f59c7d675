"""A second Trainer on a model an earlier Trainer trained: the new engine takes the model over.

[Note: a second Trainer] A ZeroEngine hooks the params it lays out (their gradient hooks; at stage
3 the units' forward hooks, and the params themselves become shards the units hold). Those hooks
stay while the engine lives, and the params keep it alive, whether or not its Trainer is still
referenced. So a second Trainer on the same model (a notebook cell run twice, a second phase of
training, a Trainer per hyperparameter trial) would build a second engine over params the first
still hooks: both would take each gradient, and the second would find it gone. The plain Trainer
allows it (the model keeps its current values; the new Trainer brings a new optimizer), so hf_zero
does too: when the Trainer builds its engine, any live engine an earlier Trainer built over any of
the model's params lets go of the model first:

    earlier engine        this Trainer's stage   what happens
    stage 1 or 2          any                    closed (its hooks removed; the params are whole on
                                                 every rank), then the new engine is built as usual
    stage 3               3                      the new engine laid out from its shards, as for a
                                                 model loaded sharded and wrapped since (relayout.py),
                                                 then closed: no rank ever holds the whole model
    stage 3               1 or 2                 each unit gathered in turn and its params given their
                                                 whole values as tensors of their own (what stages 1-2
                                                 hold on every rank), then closed; built as usual

The earlier engine's pending host step (optimizer offload) is settled first. Its Trainer can no
longer train, save or evaluate the model through it (it is closed; said once, by the first rank).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from hf_zero.engine import ZeroEngine
from hf_zero.engine.stage3.units import UnitState
from hf_zero.first_rank import is_first_rank
from hf_zero.init.relayout import relayout

_LIVE: "weakref.WeakSet[ZeroEngine]" = weakref.WeakSet()  # engines built for a Trainer, until closed


def remember(engine: ZeroEngine) -> None:
    """``engine`` was built (or taken) for a Trainer: a later Trainer's engine takes over from it."""
    _LIVE.add(engine)


def holding(model: nn.Module) -> ZeroEngine | None:
    """The live engine of an earlier Trainer that lays out any of ``model``'s params, or None."""
    params = set(model.parameters())
    for engine in list(_LIVE):
        if engine.closed:
            _LIVE.discard(engine)
        elif engine.model is model or any(p in params for p in engine.laid_out_params()):
            return engine
    return None


def take_over(model: nn.Module, earlier: ZeroEngine, options: dict) -> ZeroEngine | None:
    """Let ``earlier`` go of ``model`` ([Note: a second Trainer]); the new engine when it had to be
    laid out from ``earlier``'s shards (no optimizer yet), None when the caller builds it as usual."""
    earlier.settle()
    _LIVE.discard(earlier)
    if is_first_rank():
        warnings.warn(f"hf_zero: this model was trained by an earlier Trainer's ZeroEngine (stage "
                      f"{earlier.strategy.stage}); the new Trainer's engine takes it over with its current values and "
                      "the earlier Trainer can no longer train, evaluate or save it", UserWarning, stacklevel=4)
    if earlier.strategy.shard_params and options["stage"] == 3:
        return relayout(model, earlier, options)
    if earlier.strategy.shard_params:
        _make_whole(earlier)
    earlier.close()
    return None


@torch.no_grad()
def _make_whole(engine: ZeroEngine) -> None:
    """Stage 3 to stages 1-2: every param the engine's units hold gets its whole value, a tensor of its
    own on the unit's device, unit by unit (every rank: it gathers); the caller closes the engine."""
    whole = {}
    for unit in engine.units:
        sharded = unit.state is UnitState.SHARDED
        unit.unshard()
        for param in unit.params():
            whole[param] = param.detach().clone()
        if sharded:
            unit.reshard()
    for param, value in whole.items():
        param.data = value
