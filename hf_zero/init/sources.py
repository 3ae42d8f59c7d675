"""Where the values of a model built on the meta device come from (``materialize.ParamSource``).

- ``CheckpointSource`` (checkpoint_source.py): a checkpoint's weight files.
- ``InitSource``: random init (``from_config``). Each module's own params are initialized on
  the CPU, in a copy of the module, by the model's ``_init_weights``, under a seed derived from
  the run's seed and the module's name. Every rank and every world size gets the same model,
  whichever slices it reads, and at most one module's params exist in full at once.
"""

from __future__ import annotations

import copy
import zlib

import torch
from torch import nn


class InitSource:
    """Random init of ``model`` (built on meta) module by module, seeded by ``seed`` and module name."""

    def __init__(self, model: nn.Module, device: torch.device, seed: int) -> None:
        if not callable(getattr(model, "_init_weights", None)):
            raise TypeError(f"{type(model).__name__} has no _init_weights: hf_zero can random-init only "
                            "transformers models built on the meta device")
        self.model, self.device, self.seed = model, torch.device(device), seed
        # Shapes now: the engine points sharded params at empty tensors before it reads them all.
        self._shapes = {id(p): (p.shape, p.dtype) for p in model.parameters()}
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None

    def has(self, name: str) -> bool:
        return False  # buffers keep the values their modules computed

    def unit_start(self, params: list) -> None:
        pass  # each module is initialized where it is first read

    def read_into(self, name: str, shape: torch.Size, start: int, end: int, out: torch.Tensor) -> None:
        path, _, attr = name.rpartition(".")
        if self._cached is None or self._cached[0] != path:
            self._cached = (path, self._init_module(path))
        out.copy_(self._cached[1][attr].reshape(-1)[start:end])

    def _init_module(self, path: str) -> dict[str, torch.Tensor]:
        module = self.model.get_submodule(path)
        clone = copy.copy(module)  # its attributes (padding_idx, eps, ...), fresh params, no children
        clone._parameters = {k: None if p is None else nn.Parameter(_empty(*self._shapes[id(p)]), p.requires_grad)
                             for k, p in module._parameters.items()}
        clone._modules = {}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed((self.seed + zlib.crc32(path.encode())) % (1 << 63))
            self.model._init_weights(clone)
        return {k: p.detach() for k, p in clone._parameters.items() if p is not None}

    def unit_done(self, more_units: bool = False) -> None:
        self._cached = None

    def close(self) -> None:
        self._cached = None


def _empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def fill_whole(model: nn.Module, source) -> None:
    """After the units are filled: params they do not hold (kept whole: quantized, or below the
    persistence threshold) are still on meta, read whole on every rank; buffers go to the source's
    device, with the checkpoint's values where it has them."""
    with torch.no_grad():
        left = [(name, p) for name, p in model.named_parameters() if p.device.type == "meta"]
        source.unit_start([p for _, p in left])
        for name, p in left:
            value = torch.empty(p.numel(), dtype=p.dtype, device=source.device)
            source.read_into(name, p.shape, 0, p.numel(), value)
            torch.utils.swap_tensors(p, nn.Parameter(value.view(p.shape), p.requires_grad))
        for module_name, module in model.named_modules():
            for key, b in list(module._buffers.items()):
                if b is None:
                    continue
                name = f"{module_name}.{key}" if module_name else key
                b = b.to(source.device)
                if source.has(name):
                    source.read_into(name, b.shape, 0, b.numel(), b.view(-1))
                module._buffers[key] = b
    source.unit_done()
