"""A model loaded sharded, then wrapped (PEFT): a new engine for the wrapper, filled from the load's shards.

``get_peft_model(model)`` and ``PeftModel.from_pretrained(model, ...)`` on a model that
hf_zero/init loaded sharded keep the loaded params (the same ``nn.Parameter`` objects, held as
shards by the load's engine), freeze them, and add adapter params, whole on every rank. Until the
Trainer creates its optimizer the load's engine still gathers the base around each use, so the
wrapped model evaluates and generates. The Trainer then needs the layout a wrapped model gets
when it is loaded whole and sharded afterwards (the base frozen, the adapters trainable, per
unit: unit_plan.py); ``relayout`` builds exactly that engine over the wrapper:

1. every param of the wrapper goes back to the meta device with its full shape (``swap_tensors``:
   the objects stay, so the Trainer's optimizer and the adapters' modules still hold them);
2. a ``ZeroEngine`` is built over the wrapper from an ``EngineSource``: unit by unit, every rank
   all-gathers the load's parts that hold the new unit's params (``unit_start``, the same
   collectives on every rank) and copies its own shard out of them; the adapters and any other
   param the load's engine did not hold come from their whole values;
3. params the new engine keeps whole (quantized or below the persistence threshold) are read whole;
   the load's engine is closed (its hooks removed, its host or NVMe shards freed).

Peak memory per rank: both engines' shards (the model over W, twice) and one new unit's params in
full plus one of the load's parts in full; no rank holds the whole model.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_zero.engine import ZeroEngine
from hf_zero.engine import collectives as C
from hf_zero.init.sources import fill_whole


class EngineSource:
    """A ``materialize.ParamSource`` over ``model``'s current values: params held by units of
    ``engine`` (the load's) are read from its shards, every other param from its value now.

    Built before the params go to the meta device (``to_meta``), which it does."""

    def __init__(self, model: nn.Module, engine: ZeroEngine) -> None:
        self.engine, self.ctx = engine, engine.ctx
        self.device = engine.streams.device
        self._params = dict(model.named_parameters())
        # The load's engine, param -> (part, slot): whatever is planned into its units, sharded or whole.
        self._held: dict[nn.Parameter, tuple] = {}
        self._parts: list = []  # every part of the load's units, in its order (the same on every rank)
        for unit in engine.units:
            for part in unit.parts:
                self._parts.append(part)
                for param, slot in zip(part.params, part.buffer.slots):
                    self._held[param] = (part, slot)
        self._whole = {p: p.detach() for p in self._params.values() if p not in self._held}
        self._gathered: dict[nn.Parameter, torch.Tensor] = {}

    def to_meta(self) -> None:
        """Every param of the model on the meta device, in its full shape (the objects stay)."""
        for param in self._params.values():
            # The load's engine's gradient hooks go (it is closed next): torch installs a param's
            # post-accumulate-grad hooks with its TensorImpl, which the swap moves away, and registers
            # them there again only for a param whose hook table is None (the new engine's hooks).
            param._post_accumulate_grad_hooks = None
            held = self._held.get(param)
            shape = held[0].buffer.shapes[held[1].name] if held is not None else param.shape
            torch.utils.swap_tensors(param, nn.Parameter(torch.empty(shape, dtype=param.dtype, device="meta"),
                                                         param.requires_grad))

    def unit_start(self, params: list[nn.Parameter]) -> None:
        """Gather the load's parts that hold any of ``params`` (one at a time) and keep those params'
        full values until ``unit_done``. Every rank calls it with the same params: it communicates."""
        wanted = {p for p in params if p in self._held}
        for part in self._parts:
            members = [(p, slot) for p, slot in zip(part.params, part.buffer.slots) if p in wanted]
            if not members:
                continue
            full = self._full(part)
            for param, slot in members:
                self._gathered[param] = full[slot.range.start : slot.range.end].clone()

    def _full(self, part) -> torch.Tensor:
        shard = part.local.to(part.buffer.device)  # a host shard (parameter offload): its device copy
        if self.ctx.world_size == 1:
            return shard  # one rank: the shard is the whole part
        full = torch.empty(part.numel, dtype=part.buffer.dtype, device=part.buffer.device)
        C.wait(C.start_all_gather(self.ctx, full, shard, label="hf_zero.init relayout"))
        return full

    def has(self, name: str) -> bool:
        return False  # buffers keep the values they have

    def read_into(self, name: str, shape: torch.Size, start: int, end: int, out: torch.Tensor) -> None:
        param = self._params[name]
        value = self._gathered.get(param)
        if value is None:
            value = self._whole.get(param)
        if value is None:
            raise AssertionError(f"{name}: read before unit_start gathered it")
        out.copy_(value.reshape(-1)[start:end])

    def unit_done(self, more_units: bool = False) -> None:
        self._gathered.clear()  # its values were copied as they were asked for

    def release(self) -> None:
        """Let go of the load's engine and the values read (the new engine keeps its source)."""
        self.engine = None
        for table in (self._params, self._held, self._whole, self._gathered):
            table.clear()
        self._parts.clear()


def relayout(model: nn.Module, loaded: ZeroEngine, options: dict) -> ZeroEngine:
    """A new engine (``options``, no optimizer yet) over ``model``, which wraps the model of
    ``loaded``, with the same values; ``loaded`` is closed."""
    source = EngineSource(model, loaded)
    source.to_meta()
    engine = ZeroEngine(model, None, source=source, **options)
    fill_whole(model, source)
    source.release()
    loaded.close()
    return engine
