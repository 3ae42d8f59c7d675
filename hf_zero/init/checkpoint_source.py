"""A checkpoint as a ``materialize.ParamSource``: each rank's slices of the model's params.

``CheckpointSource(files, model, device)`` opens the weight files transformers would read
(checkpoint_files.py: safetensors or ``.bin``, a local directory or a cached hub snapshot; their
tensors: stored_tensors.py) and plans, with transformers' own conversions, which stored tensors
make each param (key_plan.py). Then for the engine, unit by unit:

- a param stored under a name transformers only renames is read by byte range: this rank's run
  of its flat elements, on a few threads, straight into the shard (parallel_reads.py);
- a param a transformers converter makes (fused MoE experts) is made whole by that converter from
  its sources, once per unit, and this rank's slice copied out (key_plan.py says why whole).

``unit_done(more_units=True)`` leaves the unit's reads running while the next unit's are asked
for (it waits for the unit before's: [Note: parallel reads]); ``unit_done()`` waits for every read
and lets go of what they opened; ``close`` of the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_zero.init.checkpoint_files import CheckpointFiles
from hf_zero.init.key_plan import KeyPlan
from hf_zero.init.stored_tensors import open_files


class MissingParams(KeyError):
    """The checkpoint has nothing, under any name transformers' conversions give, for params of the
    model: transformers' own load would initialize them (a new head)."""

    def __init__(self, missing: list[str], directory: str) -> None:
        more = f" (and {len(missing) - 1} more of the model's params)" if len(missing) > 1 else ""
        self.reason = f"the checkpoint lacks {missing[0]}{more}: transformers initializes them"
        super().__init__(f"{missing[0]}: not in the checkpoint {directory}{more}, under its own name or any "
                         "transformers' weight conversions give it; hf_zero's sharded load reads every param from "
                         "the checkpoint: one that leaves params to initialize (a new head) loads with "
                         "transformers' from_pretrained")


class CheckpointSource:
    def __init__(self, files: CheckpointFiles, model: nn.Module, device: torch.device) -> None:
        self.directory, self.device = files.directory, torch.device(device)
        self.store = open_files(files.format, files.paths)
        try:
            self.plan = KeyPlan(model, self.store.tensors)
        except BaseException:
            self.store.close()
            raise
        self._made: dict[str, torch.Tensor] = {}  # converted params of the groups read in this unit

    def has(self, name: str) -> bool:
        return self.plan.has(name)

    def check_covers(self, model: nn.Module) -> None:
        """Raise ``MissingParams`` unless every param of ``model`` comes from the checkpoint (before any read)."""
        missing = [name for name, _ in model.named_parameters() if not self.plan.has(name)]
        if missing:
            self.close()
            raise MissingParams(missing, self.directory)

    def unit_start(self, params: list) -> None:
        pass  # every read is this rank's own

    def read_into(self, name: str, shape: torch.Size, start: int, end: int, out: torch.Tensor) -> None:
        key = self.plan.direct.get(name)
        if key is not None:
            stored = self.store.tensors[key]
            if stored.shape != tuple(shape):
                raise ValueError(f"{stored.path}: tensor {key} has shape {list(stored.shape)}, the model's {name} "
                                 f"has {list(shape)}")
            self.store.read(key, start, end, out)
            return
        first = self.plan.converted.get(name)
        if first is None:
            raise KeyError(f"{name}: not in the checkpoint {self.directory} (hf_zero's sharded load needs every "
                           "param there, under its own name or one transformers' conversions give it)")
        if name not in self._made:
            self._made.update(self.plan.convert(first, self.store.read_whole))
        out.copy_(self._made[name].reshape(-1)[start:end])

    def unit_done(self, more_units: bool = False) -> None:
        self._made.clear()  # its slices were copied out as they were asked for
        if more_units:
            self.store.unit_queued()
        else:
            self.store.drain()

    def close(self) -> None:
        self._made.clear()
        self.store.close()
